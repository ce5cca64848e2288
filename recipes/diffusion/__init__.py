"""Recipe `diffusion`: IterComp (arXiv 2410.07171) on coloured shapes: gallery, rankings and reward models.

Coloured shapes with relations stand in for IterComp's text-to-image gallery, with exact ground truth: prompts in the
three categories (attribute binding, spatial, non-spatial) and a numpy renderer (shapes), an oracle that scores an
image for a prompt from its pixels (oracle), generators with controlled error rates whose images the oracle ranks
into (better, worse) pairs (gallery; real galleries: folder), and one reward model per category trained on the pairs
through ``loom run`` (data, heads; towers: models) and scored by ``loom eval`` (evaluate). Importing this package
registers the losses, the dataset and the evaluator (a job opts in with ``recipe: diffusion``). The spec:
``itercomp-tiny.yaml``; docs/recipes/diffusion.md.
"""

from recipes.diffusion import data, evaluate, heads  # modules, so that their names are not shadowed
from runtime.data import register_dataset
from runtime.evaluate import register_evaluator
from runtime.heads import register_loss

for _name, _factory in heads.LOSS_FACTORIES.items():
    register_loss(_name, _factory)
register_dataset("diffusion", data.job_batch)
register_evaluator("diffusion", evaluate.evaluate)
