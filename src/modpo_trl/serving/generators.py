"""Batched generation for evaluation and serving: one base model, LoRA adapters swapped in and out by path
(sampling itself is `modpo_trl.generation`'s).

Backends: `TransformersGenerator` (`model.generate`, the tested path; also Rewarded Soups and MOD decoding) and
`VLLMGenerator` (LoRA requests; an optional extra for GPU machines, not exercised by this repository's CPU
test-suite).
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import PartialState
from peft import PeftConfig, PeftModel
from transformers import PreTrainedModel

from ..conditioning import svd_lora
from ..generation import SamplingSettings, encode_prompt, generate_texts
from ..loading import load_tokenizer
from ..offline import ensure_offline_model
from ..runs.models import load_policy
from ..runs.recipe import EvalConfig, Recipe, RecipeError
from .mod import MODDecoder

BACKENDS = ("auto", "transformers", "vllm")
Soup = Sequence[
    tuple[str, float]
]  # (adapter folder, coefficient) pairs; also a MOD mixture's (folder, weight)


def choose_backend(name: str) -> str:
    """`auto` -> `vllm` when it is installed and a GPU is visible, else `transformers`."""
    if name not in BACKENDS:
        raise RecipeError(f"eval.backend={name!r} is not valid; valid: {list(BACKENDS)}")
    has_vllm = importlib.util.find_spec("vllm") is not None
    if name == "vllm" and not has_vllm:
        raise RecipeError(
            "eval.backend=vllm but vllm is not installed: `pip install vllm`, or eval.backend=transformers"
        )
    if name == "auto":
        return "vllm" if has_vllm and torch.cuda.is_available() else "transformers"
    return name


def lora_rank(adapter: str | Path) -> int:
    """`r` of a saved LoRA adapter (its `adapter_config.json`)."""
    return int(json.loads((Path(adapter) / "adapter_config.json").read_text())["r"])


def sampling_settings(cfg: EvalConfig) -> SamplingSettings:
    """The `eval:` section's sampling settings, checked (a bad value is a recipe error naming its key)."""
    settings = SamplingSettings(
        cfg.max_new_tokens, cfg.do_sample, cfg.temperature, cfg.top_p, cfg.batch_size, cfg.seed
    )
    try:
        settings.check()
    except ValueError as e:
        raise RecipeError(f"eval.{e}") from None
    return settings


class TransformersGenerator:
    """The recipe's base model, loaded once; LoRA adapters are loaded by path on first use and activated with
    `set_adapter`. A Rewarded Soup is built in place with peft's `add_weighted_adapter(combination_type="cat")`,
    whose delta weight is exactly `sum_i c_i * B_i A_i * scaling_i` (see `modpo_trl.evaluate`), once per soup:
    it stays loaded until one of its adapters is released. A MOD mixture decodes with every adapter of it in one
    batched forward per token (`modpo_trl.serving.mod`)."""

    def __init__(self, recipe: Recipe, settings: SamplingSettings, device: str | torch.device | None = None):
        model, self.tokenizer = load_policy(recipe)
        if not recipe.model.quantized:  # a quantised model is placed on its GPU when loaded
            model.to(device or PartialState().device)
        self.model = model.eval()
        self.settings = settings
        self._names: dict[str, str] = {}  # adapter folder -> adapter name in the PeftModel
        self._soups: dict[tuple[tuple[str, float], ...], str] = {}  # soup -> its adapter name
        self._count = 0

    def generate(
        self,
        prompts: Sequence,
        adapter: str | None = None,
        soup: Soup | None = None,
        desc: str = "Generating",
        mixture: Soup | None = None,
        settings: SamplingSettings | None = None,
        preference: list[float] | None = None,
    ) -> list[str]:
        """Responses of the base model (`adapter`, `soup` and `mixture` None), of one adapter, of a soup, or of a
        MOD mixture of adapters; sampled with `settings` (default: the generator's). `preference` is the `w` a
        preference-gated adapter runs at."""
        settings = settings or self.settings
        if mixture:
            names = [self._load(path) for path, _ in mixture]
            self._check_ungated("a MOD mixture", [path for path, _ in mixture], names)
            decoder = MODDecoder(names, [w for _, w in mixture])
            return generate_texts(self.model, self.tokenizer, prompts, settings, desc, decode=decoder)
        with self._activated(adapter, soup, preference) as model:
            return generate_texts(model, self.tokenizer, prompts, settings, desc)

    def release(self, adapter: str) -> None:
        """Unloads an adapter that no later candidate needs, and the soups built from it."""
        for key in [key for key in self._soups if any(path == str(adapter) for path, _ in key)]:
            self._delete(self._soups.pop(key))
        name = self._names.pop(str(adapter), None)
        if name is not None:
            self._delete(name)

    def save_soup(self, soup: Soup, folder: Path) -> Path:
        """Writes the soup as an ordinary adapter folder (for backends that load adapters from disk)."""
        name = self._soup(soup)
        self.model.save_pretrained(str(folder), selected_adapters=[name])
        return folder / name  # peft saves an adapter not named "default" in a sub-folder of its name

    def _load(self, adapter: str) -> str:
        adapter = str(adapter)
        if adapter in self._names:
            return self._names[adapter]
        name = (
            f"adapter_{self._count}"  # not the folder's name: module keys cannot contain dots (w-0.50-0.50)
        )
        self._count += 1
        try:
            if not isinstance(self.model, PeftModel):
                config = PeftConfig.from_pretrained(
                    adapter
                )  # a bad folder fails here, before the model changes
                config.inference_mode = True
                self.model = PeftModel(self.model, config, adapter_name=name)
            self.model.load_adapter(adapter, adapter_name=name)
            layout = svd_lora.PreferenceLoRA.load(adapter)
            if layout is not None:  # a preference-gated adapter: runs only with its w set
                svd_lora.attach(self.model, layout, name)
        except Exception as e:
            if isinstance(self.model, PeftModel) and name in self.model.peft_config:
                self._delete(name)  # half-loaded (e.g. corrupt weights): leave no trace
            raise OSError(f"could not load the LoRA adapter {adapter!r}: {type(e).__name__}: {e}") from e
        self._names[adapter] = name
        return name

    def _soup(self, soup: Soup) -> str:
        """The adapter name of `soup`, built on first use."""
        key = tuple((str(path), float(c)) for path, c in soup)
        if key in self._soups:
            return self._soups[key]
        names = [self._load(path) for path, _ in key]
        self._check_ungated("a soup", [path for path, _ in key], names)
        name = f"soup_{self._count}"
        self._count += 1
        try:
            self.model.add_weighted_adapter(names, [c for _, c in key], name, combination_type="cat")
        except Exception:
            if name in self.model.peft_config:  # add_weighted_adapter would keep a half-built soup's name
                self._delete(name)
            raise
        self.model.eval()  # the soup's new LoRA layers are created in training mode: their dropout would be on
        self._soups[key] = name
        return name

    def _gated(self) -> dict[str, svd_lora.PreferenceLoRA]:
        return svd_lora.gated_adapters(self.model) if isinstance(self.model, PeftModel) else {}

    def _check_ungated(self, what: str, paths: list[str], names: list[str]) -> None:
        gated = [path for path, name in zip(paths, names, strict=True) if name in self._gated()]
        if gated:
            raise ValueError(f"preference-gated adapters cannot enter {what}: {gated}")

    def _delete(self, name: str) -> None:
        with warnings.catch_warnings():  # "adapter X was active": every generation sets its own adapter first
            warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
            self.model.delete_adapter(name)

    @contextmanager
    def _activated(
        self, adapter: str | None, soup: Soup | None, w: list[float] | None = None
    ) -> Iterator[PreTrainedModel]:
        if soup:
            name = self._soup(soup)  # first: it may replace self.model by its PeftModel
            self.model.set_adapter(name)
            yield self.model
        elif adapter is not None:
            name = self._load(adapter)  # first: it may replace self.model by its PeftModel
            if (name in self._gated()) != (w is not None):
                raise ValueError(
                    f"the adapter {adapter} is preference-gated and needs a preference"
                    if w is None
                    else f"a preference was given for {adapter}, which is not preference-gated"
                )
            self.model.set_adapter(name)
            if w is None:
                yield self.model
            else:
                with svd_lora.preference(self.model, w, adapter_name=name):
                    yield self.model
        elif not isinstance(self.model, PeftModel):
            yield self.model
        elif self.model.peft_config:
            with self.model.disable_adapter():
                yield self.model
        else:  # every adapter was unloaded: the LoRA layers are empty and the base model is what is left
            yield self.model.get_base_model()


class VLLMGenerator:
    """vLLM with LoRA requests. Not exercised by the CPU test-suite: a convenience for GPU machines.

    Rewarded Soups are built with `TransformersGenerator.save_soup` on a CPU copy of the base model (loaded
    only when a soup is needed) and served from disk like any adapter.
    """

    def __init__(self, recipe: Recipe, settings: SamplingSettings, max_lora_rank: int):
        from vllm import LLM

        ensure_offline_model(recipe.model.path)
        self.recipe, self.settings = recipe, settings
        self.tokenizer = load_tokenizer(recipe.model.tokenizer or recipe.model.path)
        rank = 8
        while rank < max_lora_rank:  # vLLM accepts powers of two (8, 16, 32, ...)
            rank *= 2
        self.llm = LLM(
            model=recipe.model.path,
            tokenizer=recipe.model.tokenizer or recipe.model.path,
            dtype=recipe.model.dtype,
            enable_lora=True,
            max_lora_rank=rank,
            seed=settings.seed,
        )
        self._ids: dict[str, int] = {}
        self._soup_builder: TransformersGenerator | None = None
        self._soup_dir = Path(tempfile.mkdtemp(prefix="modpo_trl_soups_"))

    def generate(
        self,
        prompts: Sequence,
        adapter: str | None = None,
        soup: Soup | None = None,
        desc: str = "Generating",
        mixture: Soup | None = None,
        settings: SamplingSettings | None = None,
        preference: list[float] | None = None,
    ) -> list[str]:
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest

        if mixture:  # vLLM samples each request from one model's logits
            raise ValueError(
                "MOD decoding mixes adapters' next-token log-probs: it needs eval.backend=transformers"
            )
        if soup:
            if self._soup_builder is None:
                self._soup_builder = TransformersGenerator(self.recipe, self.settings, device="cpu")
            adapter = str(self._soup_builder.save_soup(soup, self._soup_dir / f"soup_{len(self._ids)}"))
        if preference is not None:  # vLLM runs no gates: the plain adapter equal to the gated one at w
            folder = self._soup_dir / f"w_{len(self._ids)}"
            adapter = str(svd_lora.fixed_preference_adapter(adapter, preference, folder))
        request = None
        if adapter is not None:
            lora_id = self._ids.setdefault(str(adapter), len(self._ids) + 1)
            request = LoRARequest(f"adapter_{lora_id}", lora_id, str(adapter))
        s = settings or self.settings
        params = SamplingParams(
            max_tokens=s.max_new_tokens,
            temperature=s.temperature if s.do_sample else 0.0,
            top_p=s.top_p if s.do_sample else 1.0,
            seed=s.seed,
        )
        inputs = [{"prompt_token_ids": encode_prompt(self.tokenizer, p)} for p in prompts]
        outputs = self.llm.generate(inputs, params, lora_request=request, use_tqdm=True)
        return [o.outputs[0].text for o in outputs]

    def release(self, adapter: str) -> None:
        """vLLM swaps LoRA weights itself; nothing to unload."""
