"""Recipe `alignment`: Baichuan Alignment (arXiv 2410.14940) on data with verifiable answers.

Importing this package registers the recipe's losses (``reward_bt``), its dataset (reward-model pairs with both
sequences through the model) and its evaluator with the runtime (a job opts in with ``recipe: alignment``). Modules:
tasks (the generator: two domains, rule rewards, preference pairs, PAS complements), data (the dataset), losses
(reward model, DPO, GRPO's KL penalty on SFT data), merge (linear, task arithmetic, Model Stock over exported model
folders; the phase step ``merge``), grpo (losses ``grpo_rm``: GRPO scored by the trained reward model, and
``grpo_rule``: by the rule; its prompts; the step ``reward_head``), pas (step ``pas_eval``: PAS measured), evaluate
(held-out reward accuracy, packing utilisation), make (writes the data, tokenizer and tiny Llama).
docs/recipes/alignment.md.
"""

from recipes.alignment import data, evaluate, grpo, losses, merge, pas  # modules, so that their names are not shadowed
from runtime.data import register_dataset
from runtime.evaluate import register_evaluator
from runtime.heads import register_loss

for _name, _factory in losses.LOSS_FACTORIES.items():
    register_loss(_name, _factory)
register_loss("grpo_rm", grpo.grpo_rm_head)
register_loss("grpo_rule", grpo.grpo_rule_head)
register_dataset("alignment", data.job_batch)
register_evaluator("alignment", evaluate.evaluate)
# the phase steps, registered by the orchestrator when it imports the recipe (orchestrator.recipes.import_recipe)
PHASE_STEPS = {
    "merge": dict(run=merge.merge_step, check=merge.check_merge_args, doc="merge model folders over their base "
                  "(args: method, component, base, models, weights, scale)"),
    "reward_head": dict(run=grpo.reward_head_step, check=grpo.check_reward_head_args, doc="a reward-model phase's "
                        "export with its trained scalar head (args: component, model, task)"),
    "rule_eval": dict(run=evaluate.rule_eval_step, check=evaluate.check_rule_eval_args, writes=(),
                      metrics=evaluate.RULE_METRICS, doc="a policy's greedy rule score on GRPO's held-out prompts and "
                      "its KL to a reference (args: model, reference, prompts, new_tokens, split, seed)"),
    "pas_eval": dict(run=pas.pas_eval_step, check=pas.check_pas_eval_args, writes=(), metrics=pas.METRICS,
                     doc="the answer model's held-out rule score with and without the PAS model's complement (args: "
                     "pas, model, prompts, new_tokens, seed)"),
}
