-- pairs: run-grouped training pairs (θ, θ*) for DiHyFo-1 (Section 3, after G.pt):
-- θ and θ* come from the same run and the same permuted copy (perm_index), θ from a strictly
-- earlier step than θ*. Learning and forgetting phases are both kept, so a pair may cross the
-- run's deletion step (θ learning, θ* forgetting): those are the examples of loss increments.
-- At most $cap pairs per run, the ones with the smallest hash(θ id, θ* id, $seed): a uniform,
-- deterministic sample kept by a bounded top-n aggregate (memory: runs x $cap, not pairs).
-- $start_cap > 0 first keeps at most that many pairs per θ (its smallest hashes), so that the run's
-- cap spreads over its starts: a start at step s has as many candidates as there are later
-- checkpoints, so uniform pairs come almost all from early starts and hardly ever from the trained
-- network unlearning hands DiHyFo-1. $start_cap < 0 keeps every candidate (the per-start stage:
-- pairs_spread_starts.sql).
-- $max_gap < 0 means any gap; otherwise target_step - step <= $max_gap.
-- $start_max_loss < 0 means any θ; otherwise θ's largest class loss is at most $start_max_loss (θ
-- knows every class, as the model handed to unlearning does). The view's start_loss_factor arrives
-- here already resolved into $start_max_loss (queries.views.start_threshold).
-- $target_min_retain_acc < 0 means any θ*; otherwise every class θ*'s run kept has accuracy at least
-- $target_min_retain_acc (θ* is a model that forgot only what its run deleted, as retraining should give).
-- $family > 1 (a zoo of branch families, runs family*f .. family*f + family - 1): θ* may come from
-- any run of θ's family, at θ's step or later (never θ itself), and runs are split by family, so
-- that branches, which share their checkpoints up to the deletion, never straddle train and test.
-- Only the four key columns go through the self-join (a CTE that carried the losses made the
-- 10^8-row join five times slower); losses and phases are joined to the few picked pairs.
WITH keys AS (
    SELECT checkpoint_id, run_id, step, perm_index, greatest({{losses}}) AS max_loss,
           least({{retained_accs}}) AS min_retain_acc
    FROM checkpoints
    WHERE ($split = 'all' OR run_split(run_id // $family, $split_seed, $test_fraction) = $split)
      AND ($include_augmented OR perm_index = 0)
),
candidates AS (
    SELECT a.run_id, a.checkpoint_id, b.checkpoint_id AS target_id,
           hash(CAST(a.checkpoint_id AS BIGINT), CAST(b.checkpoint_id AS BIGINT), CAST($seed AS BIGINT)) AS h
    FROM keys AS a JOIN keys AS b
      ON a.run_id // $family = b.run_id // $family AND a.perm_index = b.perm_index
     AND (a.step < b.step OR (a.step = b.step AND a.run_id <> b.run_id))
    WHERE ($max_gap < 0 OR b.step - a.step <= $max_gap)
      AND ($start_max_loss < 0 OR a.max_loss <= $start_max_loss)
      AND ($target_min_retain_acc < 0 OR b.min_retain_acc >= $target_min_retain_acc)
),
{{spread_starts}}
-- The pair travels packed in one BIGINT (θ id * 2^32 + θ* id; ids < 2^31, else DuckDB raises an
-- overflow error): twice as fast as a struct through the top-n and the unnest.
picked AS (
    SELECT unnest(min_by(CAST(checkpoint_id AS BIGINT) * 4294967296 + target_id, h, $cap)) AS code
    FROM spread
    GROUP BY run_id
)
SELECT a.run_id, a.perm_index, a.checkpoint_id, b.checkpoint_id AS target_id,
       a.step, b.step AS target_step, a.phase, b.phase AS target_phase,
       {{pair_losses}}
FROM picked AS p
JOIN checkpoints AS a ON a.checkpoint_id = p.code // 4294967296
JOIN checkpoints AS b ON b.checkpoint_id = p.code % 4294967296
ORDER BY a.checkpoint_id, b.checkpoint_id
