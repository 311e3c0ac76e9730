"""Cache keys of models, tokenizers and paths cover every input: files by content, hub ids by commit, the
`from_pretrained` arguments, the config next to the weights, an adapter's base model; and they do not change
when nothing did (a touched file, a copied folder, a source used once)."""

import copy
import json
import os
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM
from trl import DPOTrainer

from modpo_trl import ImplicitReward, RewardModel
from modpo_trl.rewards import cache
from modpo_trl.rewards.cache import file_digest, path_fingerprint
from modpo_trl.testing import tiny_causal_lm, tiny_reward_model, tiny_tokenizer, toy_preference_dataset

from .test_cache import build


def zero(prompts, responses):
    return [0.0] * len(responses)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """<root>/policy (causal LM + tokenizer), <root>/rm (reward model + tokenizer), <root>/adapter (a LoRA
    adapter of the policy, naming it as its base)."""
    root = tmp_path_factory.mktemp("models")
    tokenizer = tiny_tokenizer()
    policy = tiny_causal_lm(tokenizer)
    for name, model in [("policy", policy), ("rm", tiny_reward_model(tokenizer))]:
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    adapter = get_peft_model(
        policy, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    adapter.save_pretrained(root / "adapter")
    tokenizer.save_pretrained(root / "adapter")
    config = json.loads((root / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(root / "policy")  # what a policy loaded from there would write
    (root / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    return root


@pytest.fixture
def copy_of(models, tmp_path):
    def make(name):
        shutil.copytree(models / name, tmp_path / name)
        return tmp_path / name

    return make


def test_a_local_model_is_keyed_by_content_not_by_modification_time(copy_of, models):
    folder = copy_of("rm")
    key = path_fingerprint(folder)
    assert key == path_fingerprint(models / "rm")  # a copy elsewhere is the same model
    weights = folder / "model.safetensors"
    os.utime(weights, ns=(1, 1))
    assert path_fingerprint(folder) == key  # touched, not changed
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size; the modification time is put back, as `cp -p` or an rsync would
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path_fingerprint(folder) != key


def test_a_tokenizer_given_as_a_path_is_keyed_by_its_files(models, copy_of):
    tokenizer = copy_of("policy")
    source = RewardModel(str(models / "rm"), tokenizer=str(tokenizer))
    key = source.fingerprint()
    config = json.loads((tokenizer / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # edited on disk
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(config))
    assert source.fingerprint() != key


def test_from_pretrained_arguments_are_in_the_key(models):
    plain = RewardModel(str(models / "rm")).fingerprint()
    assert RewardModel(str(models / "rm"), model_kwargs={"dtype": torch.bfloat16}).fingerprint() != plain
    assert RewardModel(str(models / "rm"), model_kwargs={"revision": "v2"}).fingerprint() != plain
    implicit = ImplicitReward(str(models / "adapter")).fingerprint()
    assert (
        ImplicitReward(str(models / "adapter"), model_kwargs={"dtype": torch.float16}).fingerprint()
        != implicit
    )


def test_equal_weights_under_another_config_are_another_model(tokenizer):
    rm = tiny_reward_model(tokenizer)
    config = copy.deepcopy(rm.config)
    config.rms_norm_eps = 0.5
    other = type(rm)(config)
    other.load_state_dict(rm.state_dict())
    assert RewardModel(rm, tokenizer).fingerprint() != RewardModel(other, tokenizer).fingerprint()


def test_a_lora_adapter_is_keyed_with_its_base_model(models, tmp_path):
    base = tmp_path / "policy"
    shutil.copytree(models / "policy", base)
    adapter = tmp_path / "adapter"
    shutil.copytree(models / "adapter", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    key = ImplicitReward(str(adapter)).fingerprint()
    tiny_causal_lm(tiny_tokenizer(), seed=5).save_pretrained(base)  # another base model at the same path
    assert ImplicitReward(str(adapter)).fingerprint() != key


def test_a_hub_id_is_keyed_by_its_resolved_commit(tmp_path, monkeypatch):
    monkeypatch.setattr(cache.hub_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(cache.hub_constants, "HF_HUB_OFFLINE", True)
    refs = tmp_path / "models--org--reward" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("a" * 40)
    key = RewardModel("org/reward").fingerprint()
    assert RewardModel("org/reward").fingerprint() == key
    (refs / "main").write_text("b" * 40)  # the cached snapshot moved to another commit
    assert RewardModel("org/reward").fingerprint() != key
    pinned = RewardModel("org/reward", model_kwargs={"revision": "c" * 40}).fingerprint()
    (refs / "main").write_text("d" * 40)
    assert RewardModel("org/reward", model_kwargs={"revision": "c" * 40}).fingerprint() == pinned
    # not in the cache: a key that matches nothing, never the bare name
    assert RewardModel("org/unknown").fingerprint() != RewardModel("org/unknown2").fingerprint()
    assert cache.hub_commit("org/unknown") is None


def test_implicit_reward_fingerprint_does_not_change_on_first_use(models):
    source = ImplicitReward(str(models / "adapter"), max_length=32)
    before = source.fingerprint()
    source.score(["the cat"], [" sat on the mat"])
    assert source.fingerprint() == before
    source.release()
    assert source.fingerprint() == before


def test_reference_logps_of_equal_weights_under_another_config_are_computed_again(
    tokenizer, tmp_path, monkeypatch
):
    computed = []
    precompute = DPOTrainer._precompute_ref_logps  # reached by MODPOTrainer on a score-cache miss only
    monkeypatch.setattr(
        DPOTrainer, "_precompute_ref_logps", lambda self, *a: computed.append(1) or precompute(self, *a)
    )
    model = tiny_causal_lm(tokenizer)
    config = copy.deepcopy(model.config)
    config.rms_norm_eps = 0.5
    other = LlamaForCausalLM(config)
    other.load_state_dict(model.state_dict())
    for policy in (model, copy.deepcopy(model), other):
        build(
            tokenizer, tmp_path, zero, toy_preference_dataset(8), precompute_ref_log_probs=True, model=policy
        )
    assert len(computed) == 2  # the copy read the cache, the other config did not


def test_big_files_are_read_once_and_again_when_rewritten(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "REMEMBER_DIGESTS_FROM", 10)
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"0123456789" * 3)
    digest = file_digest(weights)
    remembered = list((cache.default_cache_dir() / "files").glob("*.json"))
    assert len(remembered) == 1 and json.loads(remembered[0].read_text())["digest"] == digest
    reads = []
    monkeypatch.setattr(cache, "_read_digest", lambda *args: reads.append(args) or "fresh")
    assert file_digest(weights) == digest and reads == []  # from the memo
    weights.write_bytes(b"9876543210" * 3)
    assert file_digest(weights) == "fresh" and len(reads) == 1
