"""The cluster scripts' checks that need no cluster: sweep expansion, config and hostfile validation."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs/test/cluster_mosi.yaml")
sys.path.insert(0, str(ROOT / "slurm"))
import jobtools  # noqa: E402

from fusion_dist import study  # noqa: E402
from fusion_dist.errors import UserError  # noqa: E402


def write_sweep(tmp_path: Path, **changes) -> Path:
    spec = {"script": str(ROOT / "slurm/train_mosi.sh"), "config": CONFIG, "experiment": "unit-sweep",
            "dir": str(tmp_path / "out"), "overrides": ["run.seeds=[0,1]"],
            "grid": {"model.mm_layers": [[1], [1, 3]], "model.n_fusion": [2, 4, 8]}, **changes}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in spec.items() if v is not None}))
    return path


def test_sweep_expands_the_grid_one_task_per_combination(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assigned = dict(line.split("=", 1) for line in jobtools.sweep(write_sweep(tmp_path)).splitlines())
    out = tmp_path / "out"
    assert assigned["tasks"] == "6" and assigned["experiment"] == "unit-sweep" and assigned["name"] == "out"
    uri = f"sqlite:///{out / 'mlflow.db'}"
    tasks = [line.split("\t") for line in (out / "tasks.tsv").read_text().splitlines()]
    assert len(tasks) == 6
    assert tasks[0] == ["run.seeds=[0,1]", f"tracking.uri={uri}", "tracking.experiment=unit-sweep",
                        "model.mm_layers=[1]", "model.n_fusion=2", f"run.dir={out / 'task0'}"]
    assert [t[3:5] for t in tasks] == [[f"model.mm_layers={m}", f"model.n_fusion={n}"]
                                      for m in ("[1]", "[1,3]") for n in (2, 4, 8)]
    # every line is a valid config, exactly as the array task will load it
    cfg = jobtools.load_config(CONFIG, tasks[4])
    assert (cfg.model.mm_layers, cfg.model.n_fusion, cfg.run.seeds) == ([1, 3], 4, [0, 1])
    from mlflow import MlflowClient

    assert MlflowClient(tracking_uri=uri).get_experiment_by_name("unit-sweep") is not None


@pytest.mark.parametrize("changes, message", [
    ({"grid": {"model.n_fusoin": [2, 3]}}, "task 0: command line: unknown config key 'model.n_fusoin'"),
    ({"grid": {"model.n_fusion": []}}, "'grid' must map config keys to non-empty lists"),
    ({"experiment": None}, "missing key(s) ['experiment']"),
    ({"seeds": [0, 1]}, "unknown key(s) ['seeds']"),
    ({"script": "slurm/no_such.sh"}, "script slurm/no_such.sh not found"),
])
def test_sweep_file_errors_name_the_problem(tmp_path, changes, message):
    with pytest.raises(UserError, match=re.escape(message)):
        jobtools.sweep(write_sweep(tmp_path, **changes))
    assert not (tmp_path / "out" / "tasks.tsv").exists()


def test_check_prints_the_run_dir_or_one_error_line(tmp_path):
    run = [sys.executable, str(ROOT / "slurm/jobtools.py"), "check"]
    ok = subprocess.run([*run, CONFIG, f"run.dir={tmp_path}/r"], capture_output=True, text=True, timeout=60)
    assert (ok.returncode, ok.stdout) == (0, f"{tmp_path}/r\n")
    bad = subprocess.run([*run, CONFIG, "train.epoch=3"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("fusion-dist: error: command line: unknown config key "
                                                         "'train.epoch'") and len(bad.stderr.splitlines()) == 1


def test_job_scripts_know_the_trainers_preemption_exit_code():
    from fusion_dist.train.commands import PREEMPTED_EXIT

    assert f"PREEMPTED_EXIT={PREEMPTED_EXIT} " in (ROOT / "slurm/_common.sh").read_text()


@pytest.mark.parametrize("hostfile, env, message", [
    ("localhost slots=1\nno-such-host.invalid slots=1\n", {},
     "line 2: unknown host 'no-such-host.invalid' (it does not resolve on"),
    ("# two GPUs\nlocalhost 2\n", {}, "line 2: expected 'HOSTNAME slots=N', got 'localhost 2'"),
    ("localhost slots=1\n", {"FD_NODE_RANK": "1"}, "has 1 host(s), so it must be 0..0"),
    ("# nothing\n", {}, "no hosts"),
])
def test_deepspeed_wrapper_refuses_a_bad_hostfile_before_launching(tmp_path, hostfile, env, message):
    path = tmp_path / "hostfile"
    path.write_text(hostfile)
    out = subprocess.run(["bash", str(ROOT / "launch/deepspeed.sh"), str(path), "train", CONFIG],
                         capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin", **env})
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert "fusion-dist launch" not in out.stdout  # no launcher started


STUDIES = {"slurm/sweeps/mosi_depth.yaml": 9, "configs/studies/sims_depth.yaml": 3,
           "configs/studies/mosei_depth.yaml": 3, "configs/studies/mosei_fusion_tokens.yaml": 7,
           "configs/studies/curriculum_mosei.yaml": 3, "configs/studies/curriculum_sims.yaml": 3,
           "configs/studies/ablation_fusion_block_sims.yaml": 4, "configs/studies/ablation_losses_mosei.yaml": 5,
           "configs/studies/ablation_losses_sims.yaml": 5, "configs/studies/ablation_augment_sims.yaml": 3,
           "configs/studies/ablation_gating_mosei.yaml": 3}


def test_every_shipped_sweep_and_study_file_expands(tmp_path, monkeypatch):
    """Every task of every shipped sweep / paper study is a config that loads, on its job script's geometry."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(ROOT)  # their paths are relative to the checkout
    assert set(STUDIES) == {str(p.relative_to(ROOT)) for p in [*ROOT.glob("slurm/sweeps/*.yaml"),
                                                               *ROOT.glob("configs/studies/*.yaml")]}
    for name, n in STUDIES.items():
        spec = yaml.safe_load((ROOT / name).read_text())
        path = tmp_path / Path(name).name
        path.write_text(yaml.safe_dump({**spec, "dir": str(tmp_path / Path(name).stem)}))
        assert f"tasks={n}\n" in jobtools.sweep(path), name
        assert all(r for r in study.paper_numbers(spec).values()) or name.endswith(("mosi_depth.yaml", "tokens.yaml"))


def test_study_settings_are_the_outer_loop_and_paper_names_are_checked(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    settings = [{"label": "shallow", "set": {"model.mm_layers": [1]}, "paper": {"Acc2": 80.0, "MAE": 0.5}},
                {"label": "deep", "set": {"model.mm_layers": [1, 3]}}]
    jobtools.sweep(write_sweep(tmp_path, settings=settings, grid={"model.n_fusion": [2, 4]}))
    tasks = [line.split("\t")[3:5] for line in (tmp_path / "out" / "tasks.tsv").read_text().splitlines()]
    assert tasks == [[f"model.mm_layers={m}", f"model.n_fusion={n}"] for m in ("[1]", "[1,3]") for n in (2, 4)]
    spec = study.read(write_sweep(tmp_path, settings=settings, grid=None))
    assert [t.label for t in study.tasks(spec)] == ["shallow", "deep"]
    assert study.paper_numbers(spec) == {"shallow": {"Has0_acc_2": 80.0, "Non0_acc_2": 80.0, "Mult_acc_2": 80.0,
                                                     "MAE": 0.5}, "deep": {}}
    for bad, message in [([{"label": "a", "paper": {"Acc22": 1}}], "paper metric(s) ['Acc22']"),
                         ([{"label": "a"}, {"label": "a"}], "labels must differ"),
                         ([{"set": {}}], "settings[0] must be a mapping with 'label'")]:
        with pytest.raises(UserError, match=re.escape(message)):
            study.read(write_sweep(tmp_path, settings=bad))
    with pytest.raises(UserError, match="needs 'grid' or 'settings'"):
        study.read(write_sweep(tmp_path, grid=None))


PAPER_CONFIGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs/paper").glob("*.yaml"))
JOB_SCRIPTS = sorted(p for p in (ROOT / "slurm").glob("*.sh") if p.name not in ("_common.sh", "submit.sh", "sweep.sh"))


@pytest.mark.parametrize("script", JOB_SCRIPTS, ids=lambda p: p.name)
def test_every_shipped_job_script_passes_its_own_check_on_its_own_geometry(script, monkeypatch):
    monkeypatch.delenv("FD_PROCS_PER_NODE", raising=False)
    text = script.read_text()
    config = re.search(r'FD_CONFIG:=([^}]*)}', text).group(1)
    overrides = (re.search(r'FD_OVERRIDES:=([^}]*)}', text) or re.match("()", "")).group(1).split()
    world = jobtools.world_size(script, [])
    nodes, gpus = (int(re.search(rf"^#SBATCH --{k}=(\d+)", text, re.M).group(1)) for k in ("nodes", "gpus-per-node"))
    assert world == nodes * gpus and (script.name != "train_mosi.sh" or world == 16)  # MOSI: 2 nodes x 8 GPUs
    assert jobtools.check(str(ROOT / config), overrides, world)


@pytest.mark.parametrize("config", PAPER_CONFIGS)
def test_paper_configs_run_on_any_power_of_two_ranks(config):
    from fusion_dist.config import batch_geometry, load_config

    train = load_config(ROOT / config).train
    for world in (1, 2, 4, 8, 16, 32):
        g = batch_geometry(train, world)
        assert g.micro * g.accumulation * world == train.global_batch_size and g.micro <= train.micro_batch_size


def test_geometry_derives_micro_batch_and_accumulation():
    from fusion_dist.config import ConfigError, TrainConfig, batch_geometry

    t = TrainConfig(global_batch_size=256, micro_batch_size=32)
    assert [(g.micro, g.accumulation) for g in (batch_geometry(t, w) for w in (1, 2, 8, 16, 32))] == \
        [(32, 8), (32, 4), (32, 1), (16, 1), (8, 1)]
    assert (batch_geometry(TrainConfig(global_batch_size=24, micro_batch_size=5), 2).micro,
            batch_geometry(TrainConfig(global_batch_size=24, micro_batch_size=5), 2).accumulation) == (4, 3)
    with pytest.raises(ConfigError, match=r"train.global_batch_size=256 is not divisible by the world size 24"):
        batch_geometry(t, 24)


def test_every_world_size_steps_over_the_same_samples():
    from fusion_dist.config import TrainConfig, batch_geometry
    from fusion_dist.data import RankSampler

    t, n = TrainConfig(global_batch_size=64, micro_batch_size=8), 200
    steps = {}
    for world in (1, 2, 4, 16):
        g = batch_geometry(t, world)
        per_rank = [RankSampler(n, r, world, shuffle=True, seed=3, drop_last=True, chunk=g.micro).indices()
                    for r in range(world)]
        per_step = g.micro * g.accumulation
        steps[world] = [sorted(i for idx in per_rank for i in idx[s * per_step:(s + 1) * per_step])
                        for s in range(len(per_rank[0]) // per_step)]
    assert len(steps[1]) == n // 64 and all(steps[w] == steps[1] for w in steps)


@pytest.mark.parametrize("sbatch_args, env, world", [
    ([], {}, 16), (["--nodes=4"], {}, 32), (["-N", "1"], {}, 8), (["--gpus-per-node=a100:4"], {}, 8),
    (["--gpus-per-node=0"], {}, 2), (["--gpus-per-node=0"], {"FD_PROCS_PER_NODE": "3"}, 6),
])
def test_world_size_from_sbatch_lines_and_options(sbatch_args, env, world, monkeypatch):
    monkeypatch.delenv("FD_PROCS_PER_NODE", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert jobtools.world_size(ROOT / "slurm/train_mosi.sh", sbatch_args) == world


def test_submit_refuses_a_geometry_before_queueing(tmp_path):
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run(["bash", str(ROOT / "slurm/submit.sh"), str(ROOT / "slurm/train_mosi.sh"), "--nodes=3"],
                         capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "fusion-dist: error: train.global_batch_size=256 is not divisible by the world size 24 (ranks = nodes x "
        "ranks per node); choose a global batch that is a multiple of 24, or another number of ranks"], out.stderr
