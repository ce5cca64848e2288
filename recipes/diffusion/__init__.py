"""Recipe `diffusion`: IterComp (arXiv 2410.07171) on coloured shapes: gallery, rankings and reward models.

Coloured shapes with relations stand in for IterComp's text-to-image gallery, with exact ground truth: prompts in the
three categories (attribute binding, spatial, non-spatial) and a numpy renderer (shapes), an oracle that scores an
image for a prompt from its pixels (oracle), generators with controlled error rates whose images the oracle ranks
into (better, worse) pairs (gallery; real galleries: folder), and one reward model per category trained on the pairs
through ``loom run`` (data, heads; towers: models) and scored by ``loom eval`` (evaluate); the feedback step as a
trained phase reads them as ``reward_model`` scorers (feedback), or runs them as planned MetaOps under the loss
``itercomp_feedback`` (feedback_loss). Importing this package registers the losses, the
dataset, the scorer kind and the evaluator (a job opts in with ``recipe: diffusion``). The spec:
``itercomp-tiny.yaml``; docs/recipes/diffusion.md.
"""

from recipes.diffusion import data, evaluate, feedback, feedback_loss, heads, steps  # modules: names not shadowed
from runtime.data import register_dataset
from runtime.evaluate import register_evaluator
from runtime.feedback import register_scorer
from runtime.heads import register_loss

for _name, _factory in heads.LOSS_FACTORIES.items():
    register_loss(_name, _factory)
register_loss(feedback_loss.LOSS, feedback_loss.build_feedback_head, feedback_loss.check_feedback_loss)
register_scorer("reward_model", feedback.build_reward_scorer, feedback.check_reward_scorer)
register_dataset("diffusion", data.job_batch)
register_evaluator("diffusion", evaluate.evaluate)
# the iteration's phase steps (recipes.diffusion.steps), registered by orchestrator.recipes.import_recipe
PHASE_STEPS = {
    "denoise": dict(run=steps.denoise_step, check=steps.check_denoise, metrics=("loss_first", "loss_last"),
                    doc="the base UNet trained on exact images (args: unet, text, steps, batch, lr, seed)"),
    "feedback": dict(run=steps.feedback_step, check=steps.check_feedback, metrics=steps.FEEDBACK_METRICS,
                     doc="IterComp's reward feedback of a UNet against the reward models (args: unet, text, spec, rm, "
                     "steps, batch, lr, seed, denoise_steps, stop_first, pre_loss, eval_prompts)"),
    "compare": dict(run=steps.compare_step, check=steps.check_compare, writes=(), metrics=steps.COMPARE_METRICS,
                    doc="the feedback step's report for two UNets, e.g. before and after a trained feedback phase "
                    "(args: before, after, text, spec, rm, seed, denoise_steps, eval_prompts)"),
    "regenerate": dict(run=steps.regenerate_step, check=steps.check_regenerate, writes=("data",),
                       metrics=("train_oracle_new", "heldout_oracle_new"),
                       doc="a gallery folder with the UNet's samples ranked in (args: unet, text, prompts, "
                       "heldout_prompts, samples, seed, denoise_steps)"),
    "reward_update": dict(run=steps.reward_update_step, check=steps.check_reward_update, writes=("rm",),
                          metrics=steps.UPDATE_METRICS, doc="the reward models retrained on a regenerated gallery "
                          "(args: spec, rm, data, steps, lr, eval_pairs)"),
}
