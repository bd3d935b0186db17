"""Standard class-unlearning baselines, run on the same original MLP the DiHyFo variants start from.

Every method has one signature::

    fn(model: zoo.mlp.MLP, x_train: Tensor (N, D), y_train: Tensor (N,), forget: Sequence[int],
       *, seed: int = 0, **hparams) -> nn.Module

It deep-copies ``model`` (the original is never modified), returns an :class:`~zoo.mlp.MLP` (or,
for the ``logit_mask`` control, a :class:`LogitMaskedMLP` wrapper) and is deterministic for a seed:
every shuffle and random initialization draws from a generator seeded with ``seed``.

Defaults are the published hyper-parameters (see ``../shared/notes/unlearning-evaluation.md``);
those were tuned for ResNets on CIFAR with hundreds of optimizer steps per epoch. On the 5k-MNIST
subset an epoch is ~13 steps, so methods with a small learning rate and one epoch (bad teacher,
random labels) barely move a 784-2-4 MLP; that is a property of the published settings, recorded in
docs/experiments.md, not a bug. Override any default through :func:`run_baseline`.

D_r: training examples whose label is not in ``forget``; D_f: those whose label is; D = D_r ∪ D_f.

The package, one job per module (``from hyperforget.pipelines.baselines import X`` works for every
name in ``__all__``):

- ``common``: the shared plumbing (checked inputs, seeded minibatches, trainable and finished copies,
  cross-entropy epochs)
- ``gradient``: :func:`finetune`, :func:`neggrad_plus`, :func:`random_labels`
- ``dampening``: Selective Synaptic Dampening, :func:`ssd` with :func:`ssd_importances` and :func:`ssd_dampen`
- ``teacher``: the teacher–student methods :func:`bad_teacher`, :func:`scrub`, :func:`unsir`
- ``control``: :class:`LogitMaskedMLP` and :func:`logit_mask`
- ``registry``: :class:`BaselineSpec`, ``BASELINES``, :func:`check_overrides`, :func:`run_baseline`
- ``compare``: :func:`compare_baselines` (records; pipelines.report formats them)
"""

from hyperforget.pipelines.baselines.compare import compare_baselines
from hyperforget.pipelines.baselines.control import LogitMaskedMLP, logit_mask
from hyperforget.pipelines.baselines.dampening import ssd, ssd_dampen, ssd_importances
from hyperforget.pipelines.baselines.gradient import finetune, neggrad_plus, random_labels
from hyperforget.pipelines.baselines.registry import BASELINES, BaselineSpec, check_overrides, run_baseline
from hyperforget.pipelines.baselines.teacher import bad_teacher, scrub, unsir

__all__ = ["BaselineSpec", "BASELINES", "run_baseline", "check_overrides", "LogitMaskedMLP", "ssd_dampen",
           "ssd_importances", "finetune", "neggrad_plus", "random_labels", "ssd", "bad_teacher", "scrub", "unsir",
           "logit_mask", "compare_baselines"]
