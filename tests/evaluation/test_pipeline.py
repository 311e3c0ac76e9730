"""Evaluation of a sweep: candidates, Rewarded Soups, generation, scoring, caching, reports and bad input.

The sweep is faked without training: a tiny random base model and three LoRA adapters with random (non-zero)
weights, in the layout and manifest the sweep runner writes. Scorers are rule-based functions of this module.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from modpo_trl import generation
from modpo_trl.evaluate import main
from modpo_trl.evaluation.candidates import interpolated
from modpo_trl.evaluation.pipeline import evaluate_sweep
from modpo_trl.evaluation.report import print_report
from modpo_trl.evaluation.responses import generation_fingerprint
from modpo_trl.generation import SamplingSettings, generate_texts
from modpo_trl.runs.method import Candidate, Method
from modpo_trl.runs.methods import METHODS
from modpo_trl.runs.recipe import RecipeError, load_recipe
from modpo_trl.serving import generators, mod
from modpo_trl.serving.generators import TransformersGenerator
from modpo_trl.testing import tiny_causal_lm, tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]
TAGS = {"w-1.00-0.00": [1.0, 0.0], "w-0.50-0.50": [0.5, 0.5], "w-0.20-0.80": [0.2, 0.8]}
POSITIVE = {"good", "happy", "kind", "safe", "yes", "thanks", "please", "help"}
PROMPTS = [
    "tell me a story",
    "why",
    "write a poem about a big red cat under the tree",
    "hello",
    "what is this",
]
LORA_R, LORA_ALPHA = 4, 8


def n_words(prompts, responses):
    return [float(len(_text(r).split())) for r in responses]


def positive_fraction(prompts, responses):
    words = [_text(r).split() for r in responses]
    return [sum(w in POSITIVE for w in ws) / max(len(ws), 1) for ws in words]


FLAKY = {"calls": 0, "nan_on_call": 1}


def flaky(prompts, responses):
    """NaN for every response on one call: the candidates are scored in order, one call each."""
    FLAKY["calls"] += 1
    values = positive_fraction(prompts, responses)
    return [float("nan")] * len(values) if FLAKY["calls"] - 1 == FLAKY["nan_on_call"] else values


def _text(response):
    return response if isinstance(response, str) else response[-1]["content"]


def make_adapter(folder: Path, seed: int) -> None:
    """A LoRA adapter on the saved base whose B matrices are large enough to change what the model says."""
    base = tiny_causal_lm(tiny_tokenizer(), seed=0)
    torch.manual_seed(seed)
    peft_model = get_peft_model(
        base,
        LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 2.0)
    peft_model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)


@pytest.fixture(scope="module")
def sweep_template(tmp_path_factory):
    """<root>/base (model + tokenizer), <root>/prompts.jsonl, <root>/outputs/fake/{adapters, manifest, recipe}."""
    root = tmp_path_factory.mktemp("fake_sweep")
    tokenizer = tiny_tokenizer()
    tiny_causal_lm(tokenizer, seed=0).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    run_dir = root / "outputs" / "fake"
    for seed, tag in enumerate(TAGS):
        make_adapter(run_dir / tag, seed=seed + 1)
    recipe = {
        "run_name": "fake",
        "output_dir": str(root / "outputs"),
        "model": {"path": str(root / "base"), "dtype": "float32"},
        "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "objectives": [
            {
                "name": "length",
                "data": {"path": str(REPO / "tests" / "data" / "tiny_pairs.jsonl")},
                "scorer": {"type": "function", "function": "tests.evaluation.test_pipeline:n_words"},
            },
            {
                "name": "positive",
                "reward": {
                    "type": "function",
                    "function": "tests.evaluation.test_pipeline:positive_fraction",
                },
            },
        ],
        "sweep": {"weights": list(TAGS.values())},
        "eval": {
            "prompts": {"path": str(root / "prompts.jsonl"), "conversational": True},
            "num_prompts": len(PROMPTS),
            "max_new_tokens": 5,
            "batch_size": 3,  # two batches of mixed lengths
            "temperature": 1.0,
            "backend": "transformers",
        },
    }
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    runs = {
        tag: {
            "tag": tag,
            "weights": w,
            "trainer_weights": w,
            "status": "done",
            "adapter": tag,
            "metrics": {},
            "fingerprints": {},
            "started": None,
            "finished": None,
            "error": None,
        }
        for tag, w in TAGS.items()
    }
    manifest = {
        "run_name": "fake",
        "method": "modpo",
        "base_model": str(root / "base"),
        "objectives": ["length", "positive"],
        "target": "length",
        "recipe": recipe,
        "runs": runs,
    }
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture
def sweep(sweep_template, tmp_path):
    """A fresh copy of the fake sweep for one test; returns its run directory."""
    root = tmp_path / "copy"
    shutil.copytree(sweep_template, root)
    run_dir = root / "outputs" / "fake"
    # the copy's recipe points at its own files
    text = (run_dir / "recipe.yaml").read_text().replace(str(sweep_template), str(root))
    (run_dir / "recipe.yaml").write_text(text)
    return run_dir


@pytest.fixture
def generations(monkeypatch):
    """Which candidates were generated, in order (from the progress bar's description)."""
    seen = []
    original = TransformersGenerator.generate

    def counting(self, prompts, desc="Generating", **kwargs):
        seen.append(desc.removeprefix("Generating "))
        return original(self, prompts, desc=desc, **kwargs)

    monkeypatch.setattr(TransformersGenerator, "generate", counting)
    return seen


KEYS = [
    "reference-base",
    "modpo-w-1.00-0.00",
    "modpo-w-0.50-0.50",
    "modpo-w-0.20-0.80",
    "rewarded_soups-w-0.50-0.50",
]


# ------------------------------------------------------------------------------------------------ end to end
def test_end_to_end_outputs(sweep, generations, capsys):
    assert main([str(sweep)]) == 0
    out = capsys.readouterr().out
    eval_dir = sweep / "eval"
    assert generations == KEYS

    results = json.loads((eval_dir / "results.json").read_text())
    assert [f"{c['method']}-{c['label']}" for c in results["candidates"]] == KEYS
    assert results["objectives"] == ["length", "positive"]
    for c in results["candidates"]:
        assert c["status"] == "ok", c
        for name in ("length", "positive"):
            score = c["scores"][name]
            assert score["n"] == len(PROMPTS) and score["ci"] >= 0
    by_key = {f"{c['method']}-{c['label']}": c for c in results["candidates"]}
    assert by_key["modpo-w-1.00-0.00"]["extreme"] == "length"
    assert by_key["modpo-w-0.20-0.80"]["extreme"] == "positive"
    assert by_key["modpo-w-0.50-0.50"]["extreme"] is None
    # barycentric coefficients: c1 * (1, 0) + c2 * (0.2, 0.8) = (0.5, 0.5) -> c2 = 0.625, c1 = 0.375
    soup = by_key["rewarded_soups-w-0.50-0.50"]["soup"]
    assert [s["adapter"] for s in soup] == ["w-1.00-0.00", "w-0.20-0.80"]
    assert [s["coefficient"] for s in soup] == pytest.approx([0.375, 0.625])

    pareto = results["pareto"]
    assert set(pareto["hypervolume"]) == {"reference", "modpo", "rewarded_soups"}
    assert pareto["reference_point_source"].startswith("default")
    assert pareto["non_dominated"]["all"]
    assert set(pareto["controllability"]) == {"modpo", "rewarded_soups"}
    # the reported statistics are those of the stored samples
    samples = [json.loads(line) for line in (eval_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == len(KEYS) * len(PROMPTS)
    assert all({"prompt", "response", "scores"} <= set(s) for s in samples)
    lengths = [
        s["scores"]["length"] for s in samples if s["method"] == "modpo" and s["label"] == "w-0.50-0.50"
    ]
    assert by_key["modpo-w-0.50-0.50"]["scores"]["length"]["mean"] == pytest.approx(
        sum(lengths) / len(lengths)
    )
    assert all(s["scores"]["length"] == len(s["response"].split()) for s in samples)

    # every candidate keeps its per-prompt scores, and gets its paired difference from the reference model
    reference = by_key["reference-base"]["scores"]["length"]["values"]
    mine = by_key["modpo-w-0.50-0.50"]["scores"]["length"]
    assert mine["values"] == [s for s in lengths]
    vs = mine["vs_reference"]
    assert vs["difference"] == pytest.approx(sum(mine["values"]) / 5 - sum(reference) / 5)
    assert vs["ci"][0] <= vs["difference"] <= vs["ci"][1]
    assert all(c["front"]["status"] for c in results["candidates"])
    assert pareto["intervals"]["resamples"] == 2000 and pareto["intervals"]["num_prompts"] == len(PROMPTS)
    for method, hv in pareto["hypervolume"].items():
        low, high = pareto["hypervolume_ci"][method]
        assert low <= hv <= high
    assert {(d["first"], d["second"]) for d in pareto["hypervolume_difference"]} == {
        ("modpo", "rewarded_soups"),
        ("modpo", "reference"),
        ("rewarded_soups", "reference"),
    }
    assert [(d["lower"], d["higher"]) for d in pareto["neighbours"]["modpo"]["length"]] == [
        ("w-0.20-0.80", "w-0.50-0.50"),
        ("w-0.50-0.50", "w-1.00-0.00"),
    ]

    rows = (eval_dir / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + len(KEYS)
    header = rows[0].split(",")
    for column in ("method", "label", "w_length", "w_positive", "length_mean", "length_ci", "positive_mean"):
        assert column in header
    row = dict(zip(header, rows[1 + KEYS.index("modpo-w-0.50-0.50")].split(","), strict=True))
    assert float(row["length_minus_reference_lo"]) == pytest.approx(vs["ci"][0])
    assert float(row["length_minus_reference_hi"]) == pytest.approx(vs["ci"][1])
    assert row["front"] == by_key["modpo-w-0.50-0.50"]["front"]["status"]
    metrics = (eval_dir / "metrics.csv").read_text().splitlines()
    assert metrics[0] == "metric,method,objective,first,second,estimate,ci_lo,ci_hi,resolved"
    modpo_hv = next(line.split(",") for line in metrics if line.startswith("hypervolume,modpo,"))
    assert [float(x) for x in modpo_hv[5:8]] == pytest.approx(
        [pareto["hypervolume"]["modpo"], *pareto["hypervolume_ci"]["modpo"]]
    )
    assert sum(line.startswith("neighbour_difference,modpo,") for line in metrics) == 4
    png = (eval_dir / "pareto.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert "pareto.png" in out and "hypervolume" in out and "rewarded_soups" in out
    # the summary gives both rank correlations, Spearman (the quickstart's target) and Kendall (MOC's), and
    # every headline figure with its interval
    length = pareto["controllability"]["modpo"]["length"]
    assert "controllability of modpo (Spearman / Kendall, requested weight vs score, 95%)" in out
    spearman, kendall = length["spearman_ci"], length["kendall_tau_ci"]
    assert (
        f"length {length['spearman']:+.2f} [{spearman[0]:+.2f}, {spearman[1]:+.2f}] / "
        f"{length['kendall_tau']:+.2f} [{kendall[0]:+.2f}, {kendall[1]:+.2f}]"
    ) in out
    low, high = pareto["hypervolume_ci"]["modpo"]
    assert f"modpo {pareto['hypervolume']['modpo']:.4g} [{low:.4g}, {high:.4g}]" in out
    assert f"{vs['difference']:+.4f} [{vs['ci'][0]:+.4f}, {vs['ci'][1]:+.4f}]" in out
    assert "neighbouring weightings of modpo" in out and "difference from the reference model" in out


def test_greedy_evaluation_gives_identical_results_twice(sweep, generations):
    first = evaluate_sweep(sweep, ["eval.do_sample=false"])
    first_files = {f: (sweep / "eval" / f).read_text() for f in ("results.csv", "metrics.csv")}
    # generated again, not from the cache
    second = evaluate_sweep(sweep, ["eval.do_sample=false"], force=True)
    assert generations == KEYS + KEYS
    for a, b in zip(first["candidates"], second["candidates"], strict=True):
        assert not b["cached"]
        assert {k: v for k, v in a.items() if k != "cached"} == {k: v for k, v in b.items() if k != "cached"}
    assert first["pareto"] == second["pareto"]  # the intervals too: the bootstrap is seeded
    assert {f: (sweep / "eval" / f).read_text() for f in first_files} == first_files


def test_hypervolume_uses_recipe_reference_point(sweep):
    report = evaluate_sweep(sweep, ["eval.reference_point=[-1.0, -1.0]", "eval.baselines=[reference]"])
    pareto = report["pareto"]
    assert (
        pareto["reference_point"] == [-1.0, -1.0]
        and pareto["reference_point_source"] == "eval.reference_point"
    )
    ref = next(c for c in report["candidates"] if c["method"] == "reference")
    # one point: its hypervolume is the box between it and the reference point
    expected = (ref["scores"]["length"]["mean"] + 1) * (ref["scores"]["positive"]["mean"] + 1)
    assert pareto["hypervolume"]["reference"] == pytest.approx(expected)
    assert all(c["method"] != "rewarded_soups" for c in report["candidates"])


def test_recipe_path_finds_the_sweep(sweep):
    report = evaluate_sweep(sweep / "recipe.yaml", [f"output_dir={sweep.parent}", "eval.baselines=[]"])
    assert [c["method"] for c in report["candidates"]] == ["modpo"] * 3
    assert Path(report["run_dir"]) == sweep


# ------------------------------------------------------------------------------------------ Rewarded Soups
def _hand_made_delta(folder: Path) -> dict[str, torch.Tensor]:
    """scaling * B @ A of every LoRA layer, from the saved tensors (module path -> delta)."""
    tensors = load_file(folder / "adapter_model.safetensors")
    scaling = LORA_ALPHA / LORA_R
    return {
        key.removesuffix(".lora_A.weight"): scaling * tensors[key.replace("lora_A", "lora_B")] @ tensors[key]
        for key in tensors
        if key.endswith("lora_A.weight")
    }


def test_soup_is_the_linear_interpolation_of_the_adapters(sweep):
    recipe = load_recipe(sweep / "recipe.yaml")
    a, b = sweep / "w-1.00-0.00", sweep / "w-0.20-0.80"
    c = [0.375, 0.625]
    delta_a, delta_b = _hand_made_delta(a), _hand_made_delta(b)

    # the interpolated model, built by hand: W0 + c_a * dW_a + c_b * dW_b in every targeted layer
    expected = tiny_causal_lm(tiny_tokenizer(), seed=0).eval()
    modules = dict(expected.named_modules())
    with torch.no_grad():
        for key in delta_a:
            module_name = key.removeprefix("base_model.model.")
            modules[module_name].weight += c[0] * delta_a[key] + c[1] * delta_b[key]
    x = torch.tensor([[1, 10, 20, 30, 40, 11]])
    expected_logits = expected(x).logits

    generator = TransformersGenerator(recipe, SamplingSettings(), device="cpu")
    soup = [(str(a), c[0]), (str(b), c[1])]
    with generator._activated(None, soup) as model:
        soup_logits = model(x).logits
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        key = "base_model.model.model.layers.0.self_attn.q_proj"
        assert torch.allclose(
            layer.get_delta_weight(generator._soup(soup)),
            c[0] * delta_a[key] + c[1] * delta_b[key],
            atol=1e-6,
        )
    assert torch.allclose(soup_logits, expected_logits, atol=1e-5)
    with generator.model.disable_adapter():
        assert not torch.allclose(soup_logits, generator.model(x).logits, atol=1e-3)

    # written to disk (how the vLLM backend serves a soup), it is an ordinary adapter of rank r_a + r_b
    folder = generator.save_soup(soup, sweep / "soup")
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 2 * LORA_R
    with generator._activated(str(folder), None) as model:
        assert torch.allclose(model(x).logits, expected_logits, atol=1e-5)

    # peft's "linear" combination mixes A and B separately (cross terms B_a A_b): not an interpolation
    generator.model.add_weighted_adapter(
        [generator._load(str(a)), generator._load(str(b))], c, "linear_mix", combination_type="linear"
    )
    generator.model.set_adapter("linear_mix")
    assert not torch.allclose(generator.model(x).logits, expected_logits, atol=1e-3)


def test_a_soup_samples_with_lora_dropout_off(sweep):
    """Adapters trained with dropout (the recipe default is 0.05): the soup built from them is deterministic."""
    for tag in TAGS:
        config = json.loads((sweep / tag / "adapter_config.json").read_text())
        (sweep / tag / "adapter_config.json").write_text(json.dumps({**config, "lora_dropout": 0.5}))
    generator = TransformersGenerator(load_recipe(sweep / "recipe.yaml"), SamplingSettings(), device="cpu")
    x = torch.tensor([[1, 10, 20, 30, 40, 11]])
    with generator._activated(
        None, [(str(sweep / "w-1.00-0.00"), 0.5), (str(sweep / "w-0.20-0.80"), 0.5)]
    ) as model:
        assert not any(m.training for m in model.modules())
        with torch.no_grad():
            assert torch.equal(model(x).logits, model(x).logits)


def test_extremes_and_coefficients_for_three_objectives():
    grid = [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.5, 0.0, 0.5], [0.5, 0.25, 0.25], [0.8, 0.1, 0.1]]
    modpo = [Candidate("modpo", f"p{i}", weights=w, adapter=f"/a/p{i}") for i, w in enumerate(grid)]
    soups, notes = interpolated(modpo, ["a", "b", "c"], "rewarded_soups")
    assert [m.extreme for m in modpo] == ["a", "b", "c", None, None]
    assert {s.label: dict(s.soup) for s in soups} == {
        "p3": pytest.approx({"/a/p1": 0.5, "/a/p2": 0.5}),
        "p4": pytest.approx({"/a/p0": 0.6, "/a/p1": 0.2, "/a/p2": 0.2}),
    }
    assert notes == []
    # a weighting outside the extremes' triangle cannot be interpolated: reported, not built
    outside = [
        Candidate("modpo", f"q{i}", weights=w, adapter="x")
        for i, w in enumerate(grid[:3] + [[0.2, 0.4, 0.4]])
    ]
    soups, notes = interpolated(outside, ["a", "b", "c"], "rewarded_soups")
    assert soups == [] and "q3" in notes[0] and "outside" in notes[0]


# --------------------------------------------------------------------------------------------------- MOD
def test_mod_baseline_mixes_the_extremes_at_every_weighting(sweep, generations):
    """`mod` (no training): the extremes' next-token log-probs mixed with the weighting's barycentric
    coordinates, on the same report as MODPO and Rewarded Soups, cached like every candidate."""
    report = evaluate_sweep(sweep, ["eval.baselines=[reference, rewarded_soups, mod]"])
    assert generations == [*KEYS, "mod-w-0.50-0.50"]
    by_key = {f"{c['method']}-{c['label']}": c for c in report["candidates"]}
    mod = by_key["mod-w-0.50-0.50"]
    assert mod["status"] == "ok" and mod["soup"] is None and mod["weights"] == [0.5, 0.5]
    assert [m["adapter"] for m in mod["mixture"]] == ["w-1.00-0.00", "w-0.20-0.80"]
    assert [m["weight"] for m in mod["mixture"]] == pytest.approx([0.375, 0.625])
    pareto = report["pareto"]
    assert set(pareto["hypervolume"]) == {"reference", "modpo", "rewarded_soups", "mod"}
    assert set(pareto["controllability"]) == {"modpo", "rewarded_soups", "mod"}
    # like the soups, the mixtures' point set holds the shared extremes
    assert set(pareto["non_dominated"]["mod"]) <= {"w-0.50-0.50", "w-1.00-0.00", "w-0.20-0.80"}

    recipe = load_recipe(sweep / "recipe.yaml")
    generator = TransformersGenerator(recipe, generators.sampling_settings(recipe.eval), device="cpu")
    mixture = [(str(sweep / "w-1.00-0.00"), 0.375), (str(sweep / "w-0.20-0.80"), 0.625)]
    expected = generator.generate([[{"role": "user", "content": p}] for p in PROMPTS], mixture=mixture)
    samples = [json.loads(line) for line in (sweep / "eval" / "samples.jsonl").read_text().splitlines()]
    assert [s["response"] for s in samples if s["method"] == "mod"] == expected

    generations.clear()
    evaluate_sweep(sweep, ["eval.baselines=[reference, rewarded_soups, mod]"])
    assert generations == []


def test_mod_fingerprint_covers_rule_adapters_and_weights(sweep, monkeypatch):
    recipe = load_recipe(sweep / "recipe.yaml")
    settings = generators.sampling_settings(recipe.eval)
    a, b, c = (str(sweep / tag) for tag in TAGS)

    def fp(**fields):
        return generation_fingerprint(
            recipe, Candidate("mod", "x", **fields), PROMPTS, settings, "transformers"
        )

    base = fp(mixture=[(a, 0.5), (c, 0.5)])
    assert fp(mixture=[(a, 0.5), (c, 0.5)]) == base
    assert fp(soup=[(a, 0.5), (c, 0.5)]) != base  # the same coefficients interpolating weights
    assert fp(mixture=[(a, 0.4), (c, 0.6)]) != base
    assert fp(mixture=[(b, 0.5), (c, 0.5)]) != base
    monkeypatch.setattr(mod, "RULE", "forward_kl")
    assert fp(mixture=[(a, 0.5), (c, 0.5)]) != base


# -------------------------------------------------------------------------------------------------- resume
def test_resume_and_invalidation(sweep, generations, monkeypatch):
    first = evaluate_sweep(sweep)
    assert generations == KEYS
    (sweep / "eval" / "candidates" / "modpo-w-0.50-0.50.json").unlink()
    generations.clear()
    second = evaluate_sweep(sweep)
    assert generations == ["modpo-w-0.50-0.50"]
    cached = {f"{c['method']}-{c['label']}": c["cached"] for c in second["candidates"]}
    assert cached == {k: k != "modpo-w-0.50-0.50" for k in KEYS}
    for a, b in zip(first["candidates"], second["candidates"], strict=True):
        assert a["scores"] == b["scores"]  # same seed and settings: the regenerated one too
    assert first["pareto"] == second["pareto"]

    make_adapter(sweep / "w-0.20-0.80", seed=7)  # retrained: new files
    generations.clear()
    evaluate_sweep(sweep)
    # the soup interpolates that adapter: both are stale
    assert generations == ["modpo-w-0.20-0.80", "rewarded_soups-w-0.50-0.50"]

    def no_model(*args, **kwargs):
        raise AssertionError("the base model was loaded although every candidate is cached")

    monkeypatch.setattr(TransformersGenerator, "__init__", no_model)
    generations.clear()
    evaluate_sweep(sweep)
    assert generations == []


def test_generation_fingerprint_follows_what_changes_responses(sweep):
    recipe = load_recipe(sweep / "recipe.yaml")
    soup = Candidate(
        "rewarded_soups", "x", soup=[(str(sweep / "w-1.00-0.00"), 0.5), (str(sweep / "w-0.20-0.80"), 0.5)]
    )
    settings = generators.sampling_settings(recipe.eval)

    def fp(candidate=soup, prompts=PROMPTS, settings=settings, backend="transformers"):
        return generation_fingerprint(recipe, candidate, prompts, settings, backend)

    base = fp()
    assert fp() == base
    assert fp(prompts=PROMPTS[:-1]) != base
    assert fp(settings=SamplingSettings(**{**settings.__dict__, "max_new_tokens": 3})) != base
    assert fp(settings=SamplingSettings(**{**settings.__dict__, "seed": 1})) != base
    assert fp(backend="vllm") != base
    other = Candidate(
        "rewarded_soups", "x", soup=[(p, c) for (p, _), c in zip(soup.soup, [0.4, 0.6], strict=True)]
    )
    assert fp(candidate=other) != base
    assert fp(candidate=Candidate("modpo", "x", adapter=str(sweep / "w-1.00-0.00"))) != base


# ---------------------------------------------------------------------------------------------- bad input
def test_directory_without_manifest(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"no manifest.json in {tmp_path}" in err and "python -m modpo_trl.train" in err


def test_bad_eval_settings_fail_before_loading(sweep, generations):
    with pytest.raises(RecipeError, match=r"eval.baselines has unknown entries \['soup'\]"):
        evaluate_sweep(sweep, ["eval.baselines=[soup]"])
    with pytest.raises(RecipeError, match=r"eval.reference_point=\[0.0\] has 1 entries; it needs 2"):
        evaluate_sweep(sweep, ["eval.reference_point=[0.0]"])
    with pytest.raises(RecipeError, match="eval.backend='tpu' is not valid"):
        evaluate_sweep(sweep, ["eval.backend=tpu"])
    with pytest.raises(RecipeError, match="eval.temperature=0.0 must be > 0"):
        evaluate_sweep(sweep, ["eval.temperature=0.0"])
    with pytest.raises(RecipeError, match=r"eval.confidence=95.0 must be in \(0, 1\)"):
        evaluate_sweep(sweep, ["eval.confidence=95"])
    with pytest.raises(RecipeError, match="eval.bootstrap_resamples=10 must be >= 100"):
        evaluate_sweep(sweep, ["eval.bootstrap_resamples=10"])
    assert generations == []


def test_adapter_that_fails_to_load(sweep, generations):
    (sweep / "w-0.50-0.50" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    report = evaluate_sweep(sweep)
    status = {f"{c['method']}-{c['label']}": c for c in report["candidates"]}
    broken = status["modpo-w-0.50-0.50"]
    assert broken["status"] == "failed"
    assert "could not load the LoRA adapter" in broken["error"] and "w-0.50-0.50" in broken["error"]
    assert all(c["status"] == "ok" for k, c in status.items() if k != "modpo-w-0.50-0.50")
    written = json.loads((sweep / "eval" / "results.json").read_text())
    assert [c["status"] for c in written["candidates"]].count("ok") == len(KEYS) - 1
    assert "modpo/w-0.50-0.50" not in written["pareto"]["non_dominated"]["all"]
    assert not (sweep / "eval" / "candidates" / "modpo-w-0.50-0.50.json").exists()  # retried next time


def test_scorer_returning_nan(sweep, monkeypatch):
    monkeypatch.setitem(FLAKY, "calls", 0)
    scorer = "objectives.1.scorer={type: function, function: 'tests.evaluation.test_pipeline:flaky'}"
    report = evaluate_sweep(sweep, [scorer, "eval.batch_size=8"])  # one scoring call per candidate
    failed = [c for c in report["candidates"] if c["status"] == "failed"]
    assert [f"{c['method']}-{c['label']}" for c in failed] == [KEYS[FLAKY["nan_on_call"]]]
    assert "scorer 'positive' failed" in failed[0]["error"] and "non-finite score (nan)" in failed[0]["error"]
    assert "length" in failed[0]["scores"] and "positive" not in failed[0]["scores"]
    assert sum(c["status"] == "ok" for c in report["candidates"]) == len(KEYS) - 1
    assert (sweep / "eval" / "results.json").is_file() and (sweep / "eval" / "pareto.png").is_file()


def test_objective_that_cannot_score(sweep, generations):
    with pytest.raises(RecipeError, match=r"objectives\[0\] \(length\) has neither `scorer` nor `reward`"):
        evaluate_sweep(sweep, ["objectives.0.scorer=null"])
    columns = ["objectives.1.reward={type: columns, chosen_column: a, rejected_column: b}"]
    with pytest.raises(
        RecipeError, match=r"objectives\[1\] \(positive\).reward.type=columns .* cannot score"
    ):
        evaluate_sweep(sweep, columns)
    assert generations == []


# ---------------------------------------------------------------------------------------------- generation
@pytest.fixture(scope="module")
def lm():
    tokenizer = tiny_tokenizer()
    return tiny_causal_lm(tokenizer, seed=3).eval(), tokenizer


def test_same_seed_same_samples_and_left_padding(lm):
    model, tokenizer = lm
    prompts = ["hello", "tell me a story about a big red dog", [{"role": "user", "content": "why"}]]
    settings = SamplingSettings(
        max_new_tokens=8, do_sample=True, temperature=1.0, top_p=1.0, batch_size=3, seed=5
    )
    first = generate_texts(model, tokenizer, prompts, settings)
    assert first == generate_texts(model, tokenizer, prompts, settings)
    assert first != generate_texts(
        model, tokenizer, prompts, SamplingSettings(**{**settings.__dict__, "seed": 6})
    )
    assert len(first) == 3 and all(isinstance(t, str) for t in first)
    # greedy: a prompt's answer does not depend on the longer prompts padded in beside it
    greedy = SamplingSettings(max_new_tokens=8, do_sample=False, batch_size=3)
    batched = generate_texts(model, tokenizer, prompts, greedy)
    alone = [generate_texts(model, tokenizer, [p], greedy)[0] for p in prompts]
    assert batched == alone
    assert all(len(t.split()) > 0 for t in batched)


def test_right_padding_would_be_caught(lm, monkeypatch):
    """The left-padding test above can fail: a right-padded batch changes the short prompts' answers."""
    model, tokenizer = lm
    prompts = ["hello", "tell me a story about a big red dog under the blue tree"]
    greedy = SamplingSettings(max_new_tokens=6, do_sample=False, batch_size=2)
    alone = [generate_texts(model, tokenizer, [p], greedy)[0] for p in prompts]
    ids = [generation.encode_prompt(tokenizer, p) for p in prompts]
    width = max(map(len, ids))
    input_ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in ids])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])
    out = model.generate(
        input_ids=input_ids,
        attention_mask=mask,
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    right = tokenizer.decode(out[0, width:], skip_special_tokens=True)
    assert right != alone[0]


def test_prompts_are_tokenised_as_in_training(tokenizer):
    from trl.data_utils import _tokenize

    for prompt in ["tell me a story", [{"role": "user", "content": "tell me a story"}]]:
        kwargs = {"add_generation_prompt": True} if isinstance(prompt, list) else {}
        assert generation.encode_prompt(tokenizer, prompt) == list(
            _tokenize(tokenizer, prompt, **kwargs)["input_ids"]
        )
    plain = tiny_tokenizer(chat_template=False)
    with pytest.raises(ValueError, match="need a tokenizer with a chat template"):
        generation.encode_prompt(plain, [{"role": "user", "content": "hi"}])


def test_vllm_backend_requested_but_missing(monkeypatch):
    monkeypatch.setattr(generators.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RecipeError, match="eval.backend=vllm but vllm is not installed"):
        generators.choose_backend("vllm")
    assert generators.choose_backend("auto") == "transformers"


def fake_method(monkeypatch, candidates):
    """Makes `method: moc` a method whose candidates are `candidates(recipe, run_dir)`."""

    class Fake(type(METHODS["moc"])):
        def candidates(self, recipe, run_dir, entries):
            return candidates(recipe, run_dir)

    assert isinstance(METHODS["moc"], Method)
    monkeypatch.setitem(METHODS, "moc", Fake())


def test_conditioned_candidates_get_their_prompt(sweep, monkeypatch, generations):
    """A conditioned method's hook: its candidates' prompts carry the preference; scorers see the original."""

    def prefix(w):
        return lambda messages: [{"role": "system", "content": f"length {w[0]} positive {w[1]}"}, *messages]

    fake_method(
        monkeypatch,
        lambda recipe, run_dir: [
            Candidate(
                "moc",
                f"moc w={w[0]} (held out)",  # labels may hold spaces: cache file names must not
                weights=w,
                adapter=str(run_dir / "w-0.50-0.50"),
                preference=w,
                prompt_fn=prefix(w),
            )
            for w in ([1.0, 0.0], [0.0, 1.0])
        ],
    )
    report = evaluate_sweep(sweep, ["method=moc"])
    assert [c["method"] for c in report["candidates"]] == ["reference", "moc", "moc"]
    assert "rewarded_soups" in report["notes"][0]
    samples = [json.loads(x) for x in (sweep / "eval" / "samples.jsonl").read_text().splitlines()]
    moc = [s for s in samples if s["method"] == "moc"]
    assert moc[0]["model_prompt"][0] == {"role": "system", "content": "length 1.0 positive 0.0"}
    assert moc[0]["prompt"] == [{"role": "user", "content": PROMPTS[0]}]
    assert set(report["pareto"]["controllability"]) == {"moc"}
    cache_files = sorted(p.name for p in (sweep / "eval" / "candidates").iterdir())
    assert cache_files == [
        "moc-moc_w_0.0_held_out_.json",
        "moc-moc_w_1.0_held_out_.json",
        "reference-base.json",
    ]


def test_compare_puts_another_runs_results_in_the_same_report(sweep, monkeypatch, capsys):
    """`eval.compare`: a conditioned run's report and plot also hold a MODPO sweep's evaluated candidates."""
    evaluate_sweep(sweep)  # the MODPO sweep, evaluated first
    other = sweep.parent / "moc_run"
    shutil.copytree(sweep, other, ignore=shutil.ignore_patterns("eval"))
    fake_method(
        monkeypatch,
        lambda recipe, run_dir: [
            Candidate(
                "moc",
                f"w-{w[0]}",
                weights=w,
                adapter=str(run_dir / tag),
                preference=w,
                held_out=w == [0.7, 0.3],
            )
            for w, tag in (
                ([1.0, 0.0], "w-1.00-0.00"),
                ([0.5, 0.5], "w-0.50-0.50"),
                ([0.7, 0.3], "w-0.50-0.50"),
            )
        ],
    )
    args = ["method=moc", "run_name=moc_run", f"eval.compare=[{sweep}, {sweep.parent / 'missing'}]"]
    report = evaluate_sweep(other, args)
    keys = [(c["run"], c["method"], c["label"]) for c in report["candidates"]]
    assert keys == [
        ("moc_run", "reference", "base"),  # taken once: the sweep's reference is the same model
        ("moc_run", "moc", "w-1.0"),
        ("moc_run", "moc", "w-0.5"),
        ("moc_run", "moc", "w-0.7"),
        *(("fake", "modpo", tag) for tag in TAGS),
        ("fake", "rewarded_soups", "w-0.50-0.50"),
    ]
    assert set(report["pareto"]["hypervolume"]) == {"reference", "moc", "modpo", "rewarded_soups"}
    assert set(report["pareto"]["controllability"]) == {"moc", "modpo", "rewarded_soups"}
    # the held-out preference against the scores interpolated between the trained ones
    moc = {c["label"]: c for c in report["candidates"] if c["method"] == "moc"}
    (entry,) = report["pareto"]["generalization"]["moc"]["per_preference"]
    assert entry["label"] == "w-0.7" and not entry["extrapolated"]
    for k, name in enumerate(["length", "positive"]):
        a, b = moc["w-1.0"]["scores"][name]["mean"], moc["w-0.5"]["scores"][name]["mean"]
        assert entry["interpolated"][k] == pytest.approx(0.4 * a + 0.6 * b)
        assert entry["abs_error"][k] == pytest.approx(
            abs(moc["w-0.7"]["scores"][name]["mean"] - (0.4 * a + 0.6 * b))
        )
    assert set(report["pareto"]["generalization"]) == {"moc"}
    assert any("eval.compare[1]" in n and "evaluate that run first" in n for n in report["notes"])

    rows = (other / "eval" / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + len(keys) and rows[0].startswith("run,method,label")
    print_report(report)
    assert "w-1.00-0.00 (extreme: length) [fake]" in capsys.readouterr().out

    # the compared candidates are in the paired statistics: they answered the same prompts
    fake = {c["label"]: c for c in report["candidates"] if c["method"] == "modpo"}
    assert fake["w-0.50-0.50"]["scores"]["length"]["vs_reference"]["difference"] == pytest.approx(
        fake["w-0.50-0.50"]["scores"]["length"]["mean"] - report["candidates"][0]["scores"]["length"]["mean"]
    )
    assert "modpo" in report["pareto"]["neighbours"]

    # another run of the same method, with the same labels (an ablation variant): kept, under its run's name
    variant = sweep.parent / "moc_variant"
    shutil.copytree(other, variant)
    (variant / "eval" / "results.json").write_text(
        (other / "eval" / "results.json").read_text().replace('"moc_run"', '"moc_variant"')
    )
    with_variant = evaluate_sweep(other, [*args[:2], f"eval.compare=[{sweep}, {variant}]"])
    variants = [c["label"] for c in with_variant["candidates"] if c["method"] == "moc_variant/moc"]
    assert (
        variants == ["w-1.0", "w-0.5", "w-0.7"] and "moc_variant/moc" in with_variant["pareto"]["hypervolume"]
    )
    assert [c["method"] for c in with_variant["candidates"]].count("reference") == 1
    # the variant's report also holds the sweep (its own eval.compare): taken from the sweep once, not again
    # through the variant, whose copy may be an older evaluation of it
    methods = [c["method"] for c in with_variant["candidates"]]
    assert methods.count("modpo") == len(TAGS) and "moc_variant/modpo" not in methods

    # two compared runs of one method this run lacks: the second goes by its run's name, not merged into the first
    sweep_copy = sweep.parent / "sweep_copy"
    shutil.copytree(sweep, sweep_copy)
    (sweep_copy / "eval" / "results.json").write_text(
        (sweep / "eval" / "results.json").read_text().replace('"fake"', '"fake_copy"')
    )
    both = evaluate_sweep(other, [*args[:2], f"eval.compare=[{sweep}, {sweep_copy}]"])
    methods = [c["method"] for c in both["candidates"]]
    assert methods.count("modpo") == methods.count("fake_copy/modpo") == len(TAGS)
    assert methods.count("reference") == 1 and "fake_copy/modpo" in both["pareto"]["hypervolume"]

    # results without per-prompt scores (an older version's) cannot be paired: not compared, and the note says so
    path = sweep / "eval" / "results.json"
    old = json.loads(path.read_text())
    for c in old["candidates"]:
        for score in c["scores"].values():
            del score["values"]
    path.write_text(json.dumps(old))
    report = evaluate_sweep(other, args)
    assert {c["run"] for c in report["candidates"]} == {"moc_run"}
    assert any("has no per-prompt scores" in n and "evaluate" in n for n in report["notes"])
    evaluate_sweep(sweep)  # rebuilt from the cache

    # results on other prompts are not compared, and the note says why
    report = evaluate_sweep(other, [*args, "eval.num_prompts=2"])
    assert {c["run"] for c in report["candidates"]} == {"moc_run"}
    assert any("evaluated with other prompts; not compared" in n for n in report["notes"])
