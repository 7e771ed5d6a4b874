"""The paper preset sizes CPUs per worker and loader workers from the cluster's GPU nodes."""

from __future__ import annotations

from orchestration.sweep import MAX_LOADER_WORKERS, PRESETS, node_loader_plan


def test_loader_plan_from_the_smallest_gpu_node() -> None:
    # 8 GPUs and 96 CPUs: 12 CPUs per one-GPU worker -> 1 for training, 10 would be loaders, capped at 8
    assert node_loader_plan([{"CPU": 96.0, "GPU": 8.0}], 1.0) == (MAX_LOADER_WORKERS + 1.0, MAX_LOADER_WORKERS)
    # a 4-GPU node with 16 CPUs: 4 per worker, less the trial driver's share -> 3 -> 2 loader workers
    assert node_loader_plan([{"CPU": 16.0, "GPU": 4.0}], 1.0) == (3.0, 2)
    # the smallest GPU node decides; CPU-only nodes (the head) do not count
    assert node_loader_plan([{"CPU": 64.0, "GPU": 4.0}, {"CPU": 8.0, "GPU": 2.0}, {"CPU": 2.0}], 1.0) == (3.0, 2)
    # two GPUs per worker get two GPUs' worth of CPUs
    assert node_loader_plan([{"CPU": 16.0, "GPU": 4.0}], 2.0) == (7.0, 6)
    # a node too small for any loader worker: training on the main process only
    assert node_loader_plan([{"CPU": 1.0, "GPU": 1.0}], 1.0) == (1.0, 0)
    # no GPU node (or no GPU per worker): the old fixed plan
    assert node_loader_plan([{"CPU": 32.0}], 1.0) == (3.0, 2) == node_loader_plan([{"CPU": 8.0, "GPU": 1.0}], 0.0)
    assert PRESETS["paper"]["cpus_per_worker"] == "node"


def test_a_trial_trained_before_the_stop_is_recognised_and_its_result_replayed() -> None:
    from orchestration.sweep import EPOCHS_TRAINED, replayed_result, trained_to_the_end

    done = {"epoch": 4.0, "best_val_mAP": 0.3, "test_mAP": 0.25, "system/cpu_utilization_percentage": 50.0}
    assert trained_to_the_end({}, "FINISHED", 5)
    # the driver died after the last epoch and the test were logged, before it ended the run
    assert trained_to_the_end(done, "RUNNING", 5)
    # one epoch short, or the last epoch without the test of the selected weights: train on
    assert not trained_to_the_end(done, "RUNNING", 6)
    assert not trained_to_the_end({"epoch": 4.0, "best_val_mAP": 0.3}, "RUNNING", 5)
    # a run ASHA stopped (KILLED) is never taken for a finished one
    assert not trained_to_the_end({"epoch": 1.0, "best_val_mAP": 0.3}, "KILLED", 5)
    out = replayed_result(done)
    assert out[EPOCHS_TRAINED] == 5 and out["best_val_mAP"] == 0.3 and out["test_mAP"] == 0.25
    assert not any(k.startswith("system/") for k in out)


def test_no_early_stopping_when_the_grace_period_is_the_budget() -> None:
    from orchestration.sweep import EPOCHS_TRAINED, early_stopping

    demo = PRESETS["demo"]
    assert early_stopping(demo["max_epochs"], demo["grace_period"]) is None  # the demo: both trials train to the end
    assert early_stopping(50, 50) is None and early_stopping(5, 10) is None
    asha = early_stopping(50, PRESETS["paper"]["grace_period"])
    assert type(asha).__name__ == "AsyncHyperBandScheduler" and asha._time_attr == EPOCHS_TRAINED
    assert asha._max_t == 50 and [r[0] for r in asha._brackets[0]._rungs] == [40, 20, 10]  # from the grace period
