"""The training CLI and the sweep: adapters per weighting, manifest, skipping, resuming, the shared score cache,
model loading (LoRA / QLoRA) and the errors that must come before any model is loaded."""

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from trl import DPOTrainer

from modpo_trl.rewards.sources import RewardModel
from modpo_trl.runs import data as data_module
from modpo_trl.runs import models
from modpo_trl.runs import rewards as run_rewards
from modpo_trl.runs.engine import Manifest
from modpo_trl.runs.method import complete_checkpoints
from modpo_trl.runs.recipe import RecipeError, load_recipe
from modpo_trl.testing import tiny_causal_lm, tiny_reward_model, tiny_tokenizer
from modpo_trl.train import main
from modpo_trl.trainers.modpo_trainer import MODPOTrainer

from ..helpers import fake_quantised_loading, train_recipe

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "data" / "tiny_modpo.yaml"
PAIRS = REPO / "tests" / "data" / "tiny_pairs.jsonl"
TAGS = ["w-1.00-0.00", "w-0.67-0.33", "w-0.33-0.67"]  # simplex(steps=3) with a target weight > 0
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"}


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """A tiny random policy and reward model saved with their tokenizer, as a user's local checkpoints."""
    root = tmp_path_factory.mktemp("models")
    tokenizer = tiny_tokenizer()
    for name, model in [("policy", tiny_causal_lm(tokenizer)), ("rm", tiny_reward_model(tokenizer, seed=1))]:
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


def tiny_args(saved_models, out, *extra):
    return [
        f"model.path={saved_models / 'policy'}",
        f"objectives.0.data.path={PAIRS}",
        f"objectives.1.reward.path={saved_models / 'rm'}",
        f"output_dir={out}",
        *extra,
    ]


def tiny_recipe(saved_models, out, *extra):
    return load_recipe(TINY, tiny_args(saved_models, out, *extra))


@pytest.fixture
def counts(monkeypatch):
    """Counts trainings, trained steps, reference log-prob passes and reward model scoring batches."""
    seen = {"train": 0, "steps": 0, "ref_logps": 0, "rm_batches": 0}

    def counting(cls, name, key):
        original = getattr(cls, name)

        def wrapper(*args, **kwargs):
            seen[key] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(cls, name, wrapper)

    counting(MODPOTrainer, "train", "train")
    counting(MODPOTrainer, "training_step", "steps")
    counting(DPOTrainer, "_precompute_ref_logps", "ref_logps")  # reached by MODPOTrainer on a cache miss only
    counting(RewardModel, "score", "rm_batches")
    return seen


def cache_files(kind):
    return sorted((Path(os.environ["MODPO_TRL_CACHE"]) / kind).glob("*.npz"))


def manifest_of(run_dir):
    return json.loads((run_dir / "manifest.json").read_text())


def test_sweep_trains_each_weighting_once_and_scores_the_data_once(saved_models, tmp_path, counts):
    recipe = tiny_recipe(saved_models, tmp_path)
    manifest = train_recipe(recipe)
    run_dir = tmp_path / "tiny"
    assert manifest == manifest_of(run_dir)
    assert (manifest["run_name"], manifest["method"], manifest["target"]) == ("tiny", "modpo", "helpful")
    assert manifest["objectives"] == ["helpful", "harmless"] and manifest["base_model"] == recipe.model.path
    assert list(manifest["runs"]) == TAGS
    for tag, weights in zip(TAGS, [[1.0, 0.0], [2 / 3, 1 / 3], [1 / 3, 2 / 3]], strict=True):
        run = manifest["runs"][tag]
        assert (run["status"], run["adapter"], run["error"], run["resumed_from"]) == ("done", tag, None, None)
        assert run["weights"] == run["trainer_weights"] == weights
        assert (
            run["metrics"]["step"] == 2
            and "train_loss" in run["metrics"]
            and "margin/harmless" in run["metrics"]
        )
        assert set(run["fingerprints"]) == {"recipe", "base_model", "train_data", "rewards"}
        assert ADAPTER_FILES <= {p.name for p in (run_dir / tag).iterdir()}
        # the weighting reached the trainer: the saved training arguments are that point's MODPOConfig
        args = torch.load(run_dir / tag / "training_args.bin", weights_only=False)
        assert args.weights == weights and args.objective_names == ["helpful", "harmless"]
        assert args.output_dir == str(run_dir / f".{tag}.tmp") and args.run_name == f"tiny/{tag}"
    assert sorted(p.name for p in run_dir.iterdir() if not p.name.endswith(".lock")) == sorted(
        [*TAGS, "manifest.json", ".manifest.json.bak", "recipe.yaml"]
    )  # no temp dir or partial adapter left behind
    assert load_recipe(run_dir / "recipe.yaml").weightings() == recipe.weightings()
    # 3 trainings of 2 steps; the 12 pairs' 24 responses scored once in batches of 4, and one reference pass:
    # the other weightings read both from the cache (same data, same LoRA init from the same seed)
    assert counts == {"train": 3, "steps": 6, "ref_logps": 1, "rm_batches": 6}
    assert len(cache_files("margins")) == len(cache_files("ref_logps")) == 1

    started = {tag: run["started"] for tag, run in manifest["runs"].items()}
    train_recipe(tiny_recipe(saved_models, tmp_path))  # all done: nothing trained
    assert counts["train"] == 3
    assert {tag: run["started"] for tag, run in manifest_of(run_dir)["runs"].items()} == started

    shutil.rmtree(run_dir / TAGS[1])  # a lost adapter is trained again, and only that one
    time.sleep(1.1)  # `started` has a resolution of one second
    manifest = train_recipe(tiny_recipe(saved_models, tmp_path))
    assert counts == {"train": 4, "steps": 8, "ref_logps": 1, "rm_batches": 6}
    assert manifest["runs"][TAGS[1]]["status"] == "done" and (run_dir / TAGS[1]).is_dir()
    assert manifest["runs"][TAGS[1]]["started"] != started[TAGS[1]]
    assert {t: manifest["runs"][t]["started"] for t in (TAGS[0], TAGS[2])} == {
        t: started[t] for t in (TAGS[0], TAGS[2])
    }


def test_only_sweep_index_is_trained_and_stale_folders_are_replaced(saved_models, tmp_path, counts, capsys):
    run_dir = tmp_path / "tiny"
    stale_final, stale_partial = run_dir / TAGS[2], run_dir / f".{TAGS[2]}.partial"
    for folder in (stale_final, stale_partial):  # e.g. copied by hand, or left by a crash while saving
        folder.mkdir(parents=True)
        (folder / "junk").write_text("x")
    manifest = train_recipe(tiny_recipe(saved_models, tmp_path, "sweep.index=2"))
    assert counts["train"] == 1
    assert [run["status"] for run in manifest["runs"].values()] == ["pending", "pending", "done"]
    assert not (stale_final / "junk").exists() and ADAPTER_FILES <= {p.name for p in stale_final.iterdir()}
    assert not stale_partial.exists()
    assert "[3/3] w-0.33-0.67: training ..." in capsys.readouterr().out

    # the same point under a changed recipe is kept, with a warning
    train_recipe(tiny_recipe(saved_models, tmp_path, "sweep.index=2", "training.beta=0.5"))
    assert counts["train"] == 1
    assert (
        "w-0.33-0.67 was trained under a different recipe (training.beta: 0.1 -> 0.5)"
        in capsys.readouterr().err
    )


def test_a_failed_weighting_is_recorded_and_trained_again(saved_models, tmp_path, monkeypatch):
    def boom(self, *args, **kwargs):
        raise RuntimeError("boom")

    with monkeypatch.context() as patch:
        patch.setattr(MODPOTrainer, "train", boom)
        with pytest.raises(RuntimeError, match="boom"):
            train_recipe(tiny_recipe(saved_models, tmp_path, "sweep.index=0"))
    run = manifest_of(tmp_path / "tiny")["runs"][TAGS[0]]
    assert (run["status"], run["error"]) == ("failed", "RuntimeError: boom") and run["finished"]
    assert not (tmp_path / "tiny" / TAGS[0]).exists()
    manifest = train_recipe(tiny_recipe(saved_models, tmp_path, "sweep.index=0"))
    assert manifest["runs"][TAGS[0]]["status"] == "done" and manifest["runs"][TAGS[0]]["error"] is None


SLOW_TRAINING = """
import sys, time
from modpo_trl.trainers.modpo_trainer import MODPOTrainer
step = MODPOTrainer.training_step
MODPOTrainer.training_step = lambda self, *a, **k: (time.sleep(0.5), step(self, *a, **k))[1]
from modpo_trl.train import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_killed_weighting_resumes_from_its_last_checkpoint(saved_models, tmp_path, counts, monkeypatch):
    """`python -m modpo_trl.train` (with slowed-down steps) is killed once a checkpoint exists; the next run
    resumes from it, and at no time does a half-written adapter carry a final name."""
    extra = [
        "sweep.index=0",
        "training.max_steps=10",
        "training.save_strategy=steps",
        "training.save_steps=2",
    ]
    run_dir, tmp_dir = tmp_path / "tiny", tmp_path / "tiny" / f".{TAGS[0]}.tmp"
    log = tmp_path / "killed.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", SLOW_TRAINING, str(TINY), *tiny_args(saved_models, tmp_path, *extra)],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while not complete_checkpoints(tmp_dir):
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            assert not (run_dir / TAGS[0]).exists()  # the final name appears only when complete
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert not (run_dir / TAGS[0]).exists()
    assert manifest_of(run_dir)["runs"][TAGS[0]]["status"] == "running"
    last = complete_checkpoints(tmp_dir)[-1]
    done_steps = int(last.name.split("-")[1])
    assert 2 <= done_steps < 10

    saved_to = []
    save_model = MODPOTrainer.save_model

    def checked_save(self, output_dir=None, _internal_call=False):
        if not _internal_call:  # the final adapter, not a checkpoint
            saved_to.append(Path(output_dir))
            assert not (run_dir / TAGS[0]).exists()
        return save_model(self, output_dir, _internal_call)

    monkeypatch.setattr(MODPOTrainer, "save_model", checked_save)
    manifest = train_recipe(tiny_recipe(saved_models, tmp_path, *extra))
    run = manifest["runs"][TAGS[0]]
    assert (run["status"], run["resumed_from"], run["metrics"]["step"]) == ("done", last.name, 10)
    assert counts["steps"] == 10 - done_steps  # it went on from the checkpoint instead of starting over
    assert saved_to == [run_dir / f".{TAGS[0]}.partial"]
    assert ADAPTER_FILES <= {p.name for p in (run_dir / TAGS[0]).iterdir()} and not tmp_dir.exists()


def run_cli(command, **kwargs):
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_python_m_cli_trains_one_weighting(saved_models, tmp_path):
    result = run_cli(
        [
            sys.executable,
            "-m",
            "modpo_trl.train",
            str(TINY),
            *tiny_args(saved_models, tmp_path),
            "sweep.index=0",
        ]
    )
    assert (
        "[1/3] w-1.00-0.00: training ..." in result.stdout and "[1/3] w-1.00-0.00: done in" in result.stdout
    )
    runs = manifest_of(tmp_path / "tiny")["runs"]
    assert [run["status"] for run in runs.values()] == ["done", "pending", "pending"]


def test_accelerate_launch_shares_the_score_cache_across_processes(saved_models, tmp_path):
    train_recipe(tiny_recipe(saved_models, tmp_path, "sweep.index=0"))  # fills the cache in this process
    caches = cache_files("margins") + cache_files("ref_logps")
    accelerate = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        "recipes/accelerate/cpu.yaml",
    ]
    result = run_cli(
        [*accelerate, "-m", "modpo_trl.train", str(TINY), *tiny_args(saved_models, tmp_path, "sweep.index=1")]
    )
    assert "[2/3] w-0.67-0.33: done in" in result.stdout
    assert [run["status"] for run in manifest_of(tmp_path / "tiny")["runs"].values()] == [
        "done",
        "done",
        "pending",
    ]
    # the other process computed the same keys and found them: a miss would have added files
    assert cache_files("margins") + cache_files("ref_logps") == caches and len(caches) == 2


def test_dry_run_lists_the_runs_and_touches_no_model(saved_models, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "tiny"
    train_recipe(tiny_recipe(saved_models, tmp_path, "sweep.index=0"))
    (run_dir / f".{TAGS[2]}.tmp" / "checkpoint-4").mkdir(parents=True)  # an interrupted weighting
    (run_dir / f".{TAGS[2]}.tmp" / "checkpoint-4" / "trainer_state.json").write_text("{}")
    (run_dir / f".{TAGS[2]}.tmp" / "checkpoint-6").mkdir()  # killed while saving: no trainer_state.json

    def no_model(*args, **kwargs):
        raise AssertionError("--dry-run loaded a model or data")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
    monkeypatch.setattr(data_module, "load_raw", no_model)
    function = "objectives.1.reward={type: function, function: no_such_package.scores:fn}"  # not imported
    assert main([str(TINY), *tiny_args(saved_models, tmp_path), function, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "run_name: tiny" in out and "function: no_such_package.scores:fn" in out
    rows = out.splitlines()[-3:]
    assert [row.split()[:2] for row in rows] == [["0", TAGS[0]], ["1", TAGS[1]], ["2", TAGS[2]]]
    # the function override changed a trained section: the done run is shown as such, and not retrained
    assert " done, under another recipe (objectives.1.reward.function: None -> " in rows[0]
    assert rows[0].endswith("skip (--retrain-changed retrains)")
    assert " pending " in rows[1] and rows[1].endswith("train")
    assert " pending, resumable from checkpoint-4 " in rows[2] and rows[2].endswith("train")
    assert main([str(TINY), *tiny_args(saved_models, tmp_path), "sweep.index=1", "--dry-run"]) == 0
    assert [line.rstrip().rsplit(" ", 1)[-1] for line in capsys.readouterr().out.splitlines()[-3:]] == [
        "-",
        "train",
        "-",
    ]
    # without --dry-run, the function is imported before any data or model is loaded, and fails
    assert main([str(TINY), *tiny_args(saved_models, tmp_path), function]) == 2
    assert "objectives[1] (harmless).reward.function='no_such_package.scores:fn' cannot be imported" in (
        capsys.readouterr().err
    )


def test_missing_paths_fail_before_any_loading(saved_models, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data_module, "load_raw", lambda *a, **k: pytest.fail("data loaded before the check"))
    adapter = tmp_path / "outputs" / "dpo-stage" / "w-1.00"
    implicit = f"objectives.1.reward={{type: implicit, path: {adapter.relative_to(tmp_path)}}}"
    monkeypatch.chdir(tmp_path)
    assert main([str(TINY), *tiny_args(saved_models, tmp_path), implicit]) == 2
    err = capsys.readouterr().err
    assert "objectives[1] (harmless).reward.path='outputs/dpo-stage/w-1.00' does not exist" in err
    assert "train it first" in err
    assert main([str(TINY), *tiny_args(saved_models, tmp_path), f"model.path={tmp_path / 'nope'}"]) == 2
    assert f"model.path='{tmp_path / 'nope'}' does not exist" in capsys.readouterr().err


def test_two_stages_dpo_then_modpo_with_its_implicit_reward(saved_models, tmp_path):
    """A one-objective recipe is DPO; its adapter is the next recipe's implicit margin reward."""
    stage1 = tmp_path / "dpo.yaml"
    stage1.write_text(
        "run_name: dpo-helpful\nmodel: {path: '???', dtype: float32}\n"
        "lora: {r: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj, v_proj]}\n"
        "objectives:\n  - name: helpful\n    data: {path: '???'}\n"
        "sweep: {weights: [[1.0]]}\ntraining:" + TINY.read_text().split("training:")[1]
    )
    dpo = load_recipe(stage1, tiny_args(saved_models, tmp_path)[:2] + [f"output_dir={tmp_path}"])
    assert dpo.objective_names == ["helpful"]
    assert list(train_recipe(dpo)["runs"]) == ["w-1.00"]
    adapter = tmp_path / "dpo-helpful" / "w-1.00"
    implicit = f"objectives.1.reward={{type: implicit, path: {adapter}, beta: 0.1}}"
    manifest = train_recipe(tiny_recipe(saved_models, tmp_path, implicit, "sweep.index=1"))
    assert manifest["runs"][TAGS[1]]["status"] == "done"
    assert manifest["runs"][TAGS[1]]["metrics"]["margin/harmless"] != 0.0


def test_reward_model_with_a_train_section_is_trained_first(saved_models, tmp_path, monkeypatch):
    calls = []
    rm_dir = tmp_path / "rm-trained"

    def train_reward_model(base_model, data, attributes, output_dir, *, epochs=2.0, seed=0):
        calls.append(
            {"base_model": base_model, "data": data, "attributes": attributes, "output_dir": output_dir}
        )
        shutil.copytree(saved_models / "rm", output_dir)
        return {}

    monkeypatch.setattr(run_rewards, "train_reward_model", train_reward_model)
    monkeypatch.setattr(run_rewards, "is_trained", lambda path: Path(path, "config.json").exists())
    train = f"{{base_model: {saved_models / 'rm'}, data: {PAIRS}, attributes: [harmless], epochs: 1}}"
    reward = f"objectives.1.reward={{type: reward_model, path: {rm_dir}, train: {train}}}"
    train_recipe(tiny_recipe(saved_models, tmp_path, reward, "sweep.index=0"))
    assert calls == [
        {
            "base_model": str(saved_models / "rm"),
            "data": str(PAIRS),
            "attributes": ["harmless"],
            "output_dir": str(rm_dir),
        }
    ]
    train_recipe(tiny_recipe(saved_models, tmp_path, reward, "sweep.index=1"))
    assert len(calls) == 1  # trained already
    bad = reward.replace("epochs: 1", "epoch: 1")
    with pytest.raises(
        RecipeError, match=r"objectives\[1\] \(harmless\).reward.train=.*unexpected keyword argument 'epoch'"
    ):
        train_recipe(tiny_recipe(saved_models, tmp_path, bad, "sweep.index=2"))


def _bump(path, tag, times):
    manifest = Manifest(path)
    for _ in range(times):
        manifest.update(lambda data: data.setdefault("runs", {}).update({tag: data["runs"].get(tag, 0) + 1}))


def test_concurrent_manifest_updates_keep_every_entry(tmp_path):
    """Four processes (as a job array would) read-modify-write the same manifest: no update is lost."""
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_bump, args=(tmp_path, f"w-{i}", 25)) for i in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert Manifest(tmp_path).read()["runs"] == {f"w-{i}": 25 for i in range(4)}
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


# -------------------------------------------------------------------------------------------------- models
def test_qlora_without_cuda_fails_before_loading_anything(saved_models, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("loaded")
    )
    monkeypatch.setattr(data_module, "load_raw", lambda *a, **k: pytest.fail("data loaded"))
    recipe = tiny_recipe(saved_models, tmp_path, "model.load_in_4bit=true")
    with pytest.raises(RecipeError, match=r"model.load_in_4bit=true needs a CUDA GPU \(bitsandbytes 4-bit"):
        models.load_policy(recipe)
    assert main([str(TINY), *tiny_args(saved_models, tmp_path), "model.load_in_4bit=true"]) == 2
    assert "model.load_in_4bit=true needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "tiny").exists()


def test_qlora_loading_arguments(saved_models, tmp_path, monkeypatch):
    """With CUDA (faked here), 4-bit loading asks bitsandbytes for the recipe's NF4 settings on this process's
    GPU and prepares the model for k-bit training."""
    seen = fake_quantised_loading(monkeypatch)
    recipe = tiny_recipe(
        saved_models,
        tmp_path,
        "model.load_in_4bit=true",
        "model.dtype=bfloat16",
        "model.attn_implementation=sdpa",
    )
    model, tokenizer = models.load_policy(recipe)
    quantization = seen.pop("quantization_config")
    assert quantization.load_in_4bit and quantization.bnb_4bit_quant_type == "nf4"
    assert quantization.bnb_4bit_compute_dtype == torch.bfloat16 and quantization.bnb_4bit_use_double_quant
    assert seen == {
        "path": str(saved_models / "policy"),
        "dtype": torch.bfloat16,
        "trust_remote_code": False,
        "attn_implementation": "sdpa",
        "device_map": {"": 0},
        "prepared": {"use_gradient_checkpointing": False},
    }
    assert tokenizer.pad_token == "<pad>"


def test_policy_tokenizer_lora_and_load_errors(saved_models, tmp_path):
    no_pad = tmp_path / "no-pad"
    shutil.copytree(saved_models / "policy", no_pad)
    config = json.loads((no_pad / "tokenizer_config.json").read_text())
    config.pop("pad_token")
    (no_pad / "tokenizer_config.json").write_text(json.dumps(config))
    model, tokenizer = models.load_policy(tiny_recipe(saved_models, tmp_path, f"model.path={no_pad}"))
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"  # pad = eos when missing
    assert model.dtype == torch.float32 and model.training is False

    lora = models.lora_config(tiny_recipe(saved_models, tmp_path))
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, lora.task_type) == (4, 8, 0.0, "CAUSAL_LM")
    assert lora.target_modules == {"q_proj", "v_proj"}
    assert models.lora_config(tiny_recipe(saved_models, tmp_path, "lora.enabled=false")) is None

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    tiny_tokenizer().save_pretrained(broken)  # the tokenizer loads (it is checked first): the model does not
    with pytest.raises(OSError, match=f"could not load the policy from model.path='{broken}'"):
        models.load_policy(tiny_recipe(saved_models, tmp_path, f"model.path={broken}"))
