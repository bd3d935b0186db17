-- balanced: re-sample checkpoints so that each non-pivot class's loss covers its range evenly
-- (Appendix A.6: prompt alignment improves when the training losses cover the test range).
--
-- For every non-pivot class k, the candidates' losses are put in $n_bins equal-width bins on
--   x = ln(loss_k + $offset)   when $log_scale   (losses span decades: 0.01 .. 10)
--   x = loss_k                 otherwise
-- between that class's min and max x. Then
--   mode 'cap':     keep the first $cap checkpoints of every (class, bin) in hash(checkpoint_id, $seed)
--                   order; a checkpoint is kept if any class keeps it (so a bin may end up with more
--                   than $cap rows through other classes, never fewer than min($cap, its size)).
--   mode 'weights': keep every candidate with weight = mean over classes of N / (B_k * n_{k,bin}),
--                   B_k = non-empty bins of class k; weights average 1 and flatten each class's
--                   loss histogram in expectation.
-- Non-finite losses are left out of their class's bins.
WITH candidates AS (
    SELECT checkpoint_id, run_id, step, phase, perm_index, {{losses}}
    FROM checkpoints
    WHERE ($split = 'all' OR run_split(run_id, $split_seed, $test_fraction) = $split)
      AND ($include_augmented OR perm_index = 0)
),
long AS (
    SELECT checkpoint_id, cls, loss
    FROM (UNPIVOT (SELECT checkpoint_id, {{nonpivot_losses}} FROM candidates)
          ON {{nonpivot_losses}} INTO NAME cls VALUE loss)
    WHERE isfinite(loss)
),
scaled AS (
    SELECT checkpoint_id, cls,
           CASE WHEN $log_scale THEN ln(greatest(loss, 0) + $offset) ELSE loss END AS x
    FROM long
),
ranged AS (
    SELECT *, min(x) OVER (PARTITION BY cls) AS lo, max(x) OVER (PARTITION BY cls) AS hi FROM scaled
),
binned AS (
    SELECT checkpoint_id, cls,
           -- the max lands in the last bin; a constant class has one bin
           least(CAST(floor(coalesce((x - lo) / nullif(hi - lo, 0), 0) * $n_bins) AS INTEGER), $n_bins - 1) AS bin
    FROM ranged
),
ranked AS (
    SELECT checkpoint_id, cls, bin,
           count(*) OVER (PARTITION BY cls, bin) AS bin_count,
           row_number() OVER (PARTITION BY cls, bin
                              ORDER BY hash(CAST(checkpoint_id AS BIGINT), CAST($seed AS BIGINT)), checkpoint_id) AS bin_rank
    FROM binned
),
bins_per_class AS (
    SELECT cls, count(DISTINCT bin) AS bins FROM binned GROUP BY cls
),
per_checkpoint AS (
    SELECT checkpoint_id,
           bool_or(bin_rank <= $cap) AS picked,
           avg(1.0 / (bin_count * bins)) AS raw_weight
    FROM ranked JOIN bins_per_class USING (cls)
    GROUP BY checkpoint_id
)
SELECT c.checkpoint_id, c.run_id, c.step, c.phase, c.perm_index, {{c_losses}},
       CAST(CASE WHEN $mode = 'weights'
                 THEN p.raw_weight * (SELECT count(*) FROM per_checkpoint)
                 ELSE 1.0 END AS FLOAT) AS weight
FROM per_checkpoint p JOIN candidates c USING (checkpoint_id)
WHERE $mode = 'weights' OR p.picked
ORDER BY c.checkpoint_id
