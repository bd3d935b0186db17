-- runs: one row per training run, summarised from `checkpoints`.
-- Run-level settings are constant within a run, so any_value() is exact for them.
SELECT
    run_id,
    count(*) AS num_checkpoints,                                   -- originals and permuted copies
    count(*) FILTER (WHERE perm_index = 0) AS num_originals,
    min(step) AS first_step,
    max(step) AS last_step,
    max(epoch) AS last_epoch,
    any_value(run_kind) AS run_kind,
    any_value(seed) AS seed,
    any_value(lr) AS lr,
    any_value(undersampled) AS undersampled,
    any_value(undersample_rates) AS undersample_rates,
    any_value(deleted) AS deleted,
    any_value(deletion_step) AS deletion_step,
    count(*) FILTER (WHERE phase = 'forgetting' AND perm_index = 0) AS num_forgetting,
    min(test_loss) AS best_test_loss,
    max(test_acc) AS best_test_acc,
    arg_max(test_acc, step) FILTER (WHERE perm_index = 0) AS final_test_acc,
    {{final_losses}}                                               -- loss_k at the run's last saved step
FROM checkpoints
GROUP BY run_id
