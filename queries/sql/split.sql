-- split: a train/test split by run. A run is on the test side when
--   hash(run_id, $split_seed) mod 1e6 < $test_fraction * 1e6
-- so every checkpoint of a run (originals and copies) lands on the same side, and the split
-- is a pure function of (run_id, seed, fraction): the same for every view built with them.
-- Parameters: $split ('train' | 'test' | 'all'), $split_seed, $test_fraction, $include_augmented.
SELECT
    checkpoint_id,
    run_id,
    step,
    phase,
    perm_index,
    {{losses}},
    run_split(run_id, $split_seed, $test_fraction) AS split
FROM checkpoints
WHERE ($split = 'all' OR run_split(run_id, $split_seed, $test_fraction) = $split)
  AND ($include_augmented OR perm_index = 0)
ORDER BY checkpoint_id
