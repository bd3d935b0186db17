"""Every fixed seed and seed stride of the project, named in one place.

Seeds are derived, never drawn: a value here changes what every artifact holds, so each is a
version of the outputs rather than a tunable. Strides are primes (or large odd numbers) so that
``seed * stride + k`` streams of different seeds do not overlap for any realistic k.
"""

RETRAIN_SEED_BASE = 100  # retrained model i of a run has seed 100 + i (the original model has the run's seed, 0)
QUALITY_SEED_BASE = 1 << 20  # hyper.quality's sampling seeds: far above those training and selection use
REFERENCE_SEED_BASE = 1_000_003_000  # pipelines.evaluate's reference populations: far from run and zoo seeds
TRAIN_RANK_STRIDE = 7919  # the trainer's generator: seed * stride + DDP rank
TRAIN_RESUME_STRIDE = 1_000_003  # ... re-seeded on resume: + stride * step, a stream no earlier step used
EPOCH_SHUFFLE_STRIDE = 100_003  # in-memory stream's per-epoch order: seed * stride + epoch
LOADER_EPOCH_STRIDE = 1_000_003  # streaming loader's per-epoch salt: seed * stride + epoch
SAMPLE_INIT_STRIDE = 100_003  # sampler's fresh DiHyFo-1 starts: seed * stride + row
ALIGNMENT_SEED = 12345  # the trainer's periodic prompt-alignment check (fixed, comparable across steps)


def retraining_seeds(n: int) -> tuple[int, ...]:
    """Seeds of a run's n retrained models."""
    return tuple(RETRAIN_SEED_BASE + i for i in range(n))
