"""Recipe `medical`: UniMed-style multi-task medical imaging (arXiv 2409.19890).

One shared ViT encoder; a decomposed decoder (learned queries -> per-query class and mask) and a
composed decoder (annotations as discrete tokens, autoregressive) read its output; unlabelled scans
train it through masked-image reconstruction in the same run. Importing this package registers the
recipe's losses and dataset with the runtime (a job opts in with ``recipe: medical``) and its
evaluator with ``loom eval``. Specs: ``unimed-tiny.yaml`` (CPU training), ``unimed-base-64xH100.yaml``
(planning). Modules: scans (synthetic scan generator, vocabulary), data (task batches), manifest
(a folder of real PNG scans), heads (losses and predictions), evaluate (metrics and the transfer probe).
"""

from recipes.medical import data, evaluate, heads  # modules, so that their names are not shadowed
from runtime.data import register_dataset
from runtime.evaluate import register_evaluator
from runtime.heads import register_loss

for _name, _factory in heads.LOSS_FACTORIES.items():
    register_loss(_name, _factory)
register_dataset("medical", data.job_batch)
register_evaluator("medical", evaluate.evaluate)
