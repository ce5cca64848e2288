"""Recipe `alignment`: Baichuan Alignment (arXiv 2410.14940) on data with verifiable answers.

Importing this package registers the recipe's losses (``reward_bt``), its dataset (reward-model pairs with both
sequences through the model) and its evaluator with the runtime (a job opts in with ``recipe: alignment``). Modules:
tasks (the generator: two domains, rule rewards, preference pairs, PAS complements), data (the dataset), losses
(reward model, DPO, GRPO's KL penalty on SFT data: loss ``sft_kl``), merge (linear, task arithmetic, Model Stock over exported model
folders; the phase step ``merge``), grpo (losses ``grpo_rm``: GRPO scored by the trained reward model, and
``grpo_rule``: by the rule; its prompts; the step ``reward_head``), pas (step ``pas_eval``: PAS measured), pas_data
(step ``pas_data``: SFT prompts augmented by PAS), evaluate
(held-out reward accuracy, packing utilisation; step ``rule_eval``), make (writes the data, tokenizer and tiny
Llama), generation (greedy answers of an exported model). The data and evaluation phases (issue 18; each a pair of
steps): button_steps (BUTTON: modules button, button_world, button_eval), supercorrect (SuperCorrect:
supercorrect_data, supercorrect_errors), datasculpt (DataSculpt packing: datasculpt_pack), mixture (data-mixture detection:
mixture_estimate), judge_steps (SysBench and FB-Bench: modules sysbench, fbbench, judge, judge_data).
docs/recipes/alignment.md.
"""

# modules, so that their names are not shadowed
from recipes.alignment import (
    button_steps, data, datasculpt, evaluate, grpo, judge_steps, losses, merge, mixture, pas, pas_data, supercorrect,
    supercorrect_errors,
)
from runtime.data import register_dataset
from runtime.evaluate import register_evaluator
from runtime.heads import register_loss

for _name, _factory in losses.LOSS_FACTORIES.items():
    register_loss(_name, _factory, losses.LOSS_CHECKS.get(_name))
register_loss("grpo_rm", grpo.grpo_rm_head, grpo.check_grpo_rm)
register_loss("grpo_rule", grpo.grpo_rule_head, grpo.check_grpo_rule)
register_dataset("alignment", data.job_batch)
register_evaluator("alignment", evaluate.evaluate)
# the phase steps, registered by the orchestrator when it imports the recipe (orchestrator.recipes.import_recipe)
PHASE_STEPS = {
    "merge": dict(run=merge.merge_step, check=merge.check_merge_args, component_args=("component",),
                  doc="merge model folders over their base (args: method, component, base, models, weights, scale)"),
    "reward_head": dict(run=grpo.reward_head_step, check=grpo.check_reward_head_args, component_args=("component",),
                        doc="a reward-model phase's export with its trained scalar head (args: component, model, "
                        "task)"),
    "rule_eval": dict(run=evaluate.rule_eval_step, check=evaluate.check_rule_eval_args, writes=(),
                      metrics=evaluate.RULE_METRICS + evaluate.BASELINE_METRICS, doc="a policy's greedy rule score on "
                      "GRPO's held-out prompts, its KL to a reference and its gain over a baseline (args: model, "
                      "reference, baseline, prompts, new_tokens, split, seed)"),
    "pas_eval": dict(run=pas.pas_eval_step, check=pas.check_pas_eval_args, writes=(), metrics=pas.METRICS,
                     doc="the answer model's held-out rule score with and without the PAS model's complement (args: "
                     "pas, model, prompts, new_tokens, seed)"),
    "pas_data": dict(run=pas_data.data_step, check=pas_data.check_data_args, writes=("data",), metrics=pas_data.METRICS,
                     doc="SFT data with a share of its prompts augmented by the PAS model's complements (args: pas, "
                     "source, share, seed)"),
    # BUTTON (arXiv 2410.12952): compositional function-calling trajectories, and their executed evaluation
    "button_data": dict(run=button_steps.data_step, check=button_steps.check_data_args, writes=("data",),
                        doc="BUTTON's train trajectories, chat format (args: kinds, rows, seed, tasks)"),
    "button_eval": dict(run=button_steps.eval_step, check=button_steps.check_eval_args, writes=(),
                        metrics=button_steps.METRICS, doc="a model plays held-out BUTTON tasks, its calls executed "
                        "(args: model, component, kinds, tasks, limit, seed, max_turns, new_tokens)"),
    # SuperCorrect (arXiv 2410.09008; recipes/alignment/supercorrect.py)
    "supercorrect_data": dict(run=supercorrect.data_step, check=supercorrect.check_data_args, writes=("data",),
                              metrics=supercorrect.DATA_METRICS, doc="SuperCorrect's SFT rows and cross-model DPO "
                              "pairs at the first wrong step (args: style, train, heldout, seed)"),
    "supercorrect_eval": dict(run=supercorrect.eval_step, check=supercorrect.check_eval_args, writes=(),
                              metrics=supercorrect.EVAL_METRICS, doc="first errors located and fixed, answer accuracy "
                              "on held-out problems (args: model, problems, limit, new_tokens)"),
    "supercorrect_errors": dict(run=supercorrect_errors.errors_step, check=supercorrect_errors.check_args,
                                writes=("data",), metrics=supercorrect_errors.METRICS, doc="cross-model DPO pairs at "
                                "the HSFT student's own first wrong step, missed errors and false alarms balanced "
                                "(args: model, problems, limit, balance, seed, new_tokens, batch_size)"),
}
PHASE_STEPS |= judge_steps.PHASE_STEPS  # sysbench, fbbench: evaluation steps with declared metrics
# DataSculpt packing and data-mixture detection (issue 18 items 3-4; docs/recipes/alignment.md)
PHASE_STEPS |= {
    "datasculpt": dict(run=datasculpt.step, check=datasculpt.check_args, writes=("data",), metrics=datasculpt.METRICS,
                       doc="pack a corpus into context windows by DataSculpt, against first-fit (args: corpus, "
                       "documents, window, tokenizer, clusters, dims, seed)"),
    "mixture_data": dict(run=mixture.data_step, check=mixture.check_data_args, writes=("data",),
                         metrics=tuple(f"true_{d}" for d in mixture.DOMAINS), doc="a known mixture of synthetic "
                         "domains and labelled reference text (args: mixture, documents, reference_documents, seed)"),
    "mixture_eval": dict(run=mixture.eval_step, check=mixture.check_eval_args, writes=(), metrics=mixture.EVAL_METRICS,
                         doc="estimate a model's training mixture from its generations (args: model, reference, "
                         "truth, samples, new_tokens, seed)"),
}
