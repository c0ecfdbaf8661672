"""LoRA (Hu et al., 2021): a frozen Linear plus a trainable low-rank update, several per layer.

    y = base(x) + dropout(x) @ A.T @ B.T * scaling,  A (r, in), B (out, r), scaling = alpha / r

A starts like PEFT's (kaiming-uniform, a=sqrt(5)) and B at zero, so a new adapter leaves the
model unchanged. `LoRALinear` wraps an nn.Linear or a QuantizedLinear (QLoRA) in place and
holds any number of named adapters: one is active, or `route_adapters` gives each token of a
batch its own (one base model serving several fine-tunes). Adapters are saved and loaded in
PEFT's layout (adapter_config.json + adapter_model.safetensors under Hugging Face module names),
so `peft.PeftModel.from_pretrained` reads what Pagoda trains and Pagoda serves what PEFT trained.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from pagoda.errors import ConfigError, ModelNotFoundError, WeightsError
from pagoda.model.hf_checkpoint import (
    _read_json,
    atomic_json,
    atomic_safetensors,
    hf_tensor_name,
    pagoda_tensor_name,
)
from pagoda.model.quantized import QuantizedLinear, shared_parameter_ids
from pagoda.paths import fsync_path

M = TypeVar("M", bound=nn.Module)
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraConfig:
    """Rank, scale and placement of one adapter."""

    r: int = 8  # rank of the update B @ A
    alpha: float = 16.0  # the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora)
    dropout: float = 0.05  # on the adapter's input only, in training
    target_modules: tuple[str, ...] = DEFAULT_TARGETS  # module names, or suffixes after a "."
    use_rslora: bool = False  # rank-stabilised scaling (Kalajdzievski, 2023); PEFT's option

    def __post_init__(self) -> None:
        targets = self.target_modules
        self.target_modules = (targets,) if isinstance(targets, str) else tuple(targets)
        if not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise ConfigError(f"LoRA alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules:
            raise ConfigError("LoRA target_modules is empty: name the Linear layers to adapt")

    @property
    def scaling(self) -> float:
        """The factor on B @ A x."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


@dataclass
class AdapterRouting:
    """Which rows of a flattened (B*T) batch each adapter applies to, shared by every layer of
    one forward pass. `rows` is None when an adapter covers the whole batch."""

    n_tokens: int
    groups: list[tuple[str, torch.Tensor | None]] = field(default_factory=list)


def _float_dtype_device(base: nn.Module) -> tuple[torch.dtype, torch.device]:
    ref = base.scales if isinstance(base, QuantizedLinear) else base.weight
    return ref.dtype, ref.device


class LoRALinear(nn.Module):
    """A Linear (`base`, frozen) plus named low-rank adapters; see the module docstring."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear | QuantizedLinear):
            raise ConfigError(f"LoRA wraps nn.Linear or QuantizedLinear, not {type(base).__name__}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_A = nn.ParameterDict()  # adapter name -> (r, in)
        self.lora_B = nn.ParameterDict()  # adapter name -> (out, r)
        self.lora_dropout = nn.ModuleDict()
        self.configs: dict[str, LoraConfig] = {}
        self.active: str | None = None
        self.merged: list[str] = []  # adapters added into base.weight (at most one)
        self.routing: AdapterRouting | None = None  # set by route_adapters for one pass

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (nn.Linear bases), for code that reads `.weight` of a projection."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def adapters(self) -> list[str]:
        return list(self.lora_A.keys())

    def add_adapter(self, name: str, config: LoraConfig, A: torch.Tensor | None = None,
                    B: torch.Tensor | None = None, trainable: bool = True) -> None:
        """New adapter `name`: PEFT's init (A kaiming-uniform, B zero) unless A and B are given.
        Its parameters are float32 (or the base's dtype when wider) for stable training."""
        if name in self.lora_A:
            raise ConfigError(f"adapter '{name}' already exists on this layer")
        dtype, device = _float_dtype_device(self.base)
        dtype = torch.promote_types(dtype, torch.float32)
        if A is None or B is None:
            A = torch.empty(config.r, self.in_features, dtype=dtype, device=device)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            B = torch.zeros(self.out_features, config.r, dtype=dtype, device=device)
        self.lora_A[name] = nn.Parameter(A.detach().to(device=device, dtype=dtype).clone(),
                                         requires_grad=trainable)
        self.lora_B[name] = nn.Parameter(B.detach().to(device=device, dtype=dtype).clone(),
                                         requires_grad=trainable)
        dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.lora_dropout[name] = dropout.train(self.training)  # follows model.eval()/train()
        self.configs[name] = config

    def remove_adapter(self, name: str) -> None:
        """Drop adapter `name` (unmerging it first if it is merged)."""
        if name in self.merged:
            self.unmerge(name)
        del self.lora_A[name], self.lora_B[name], self.lora_dropout[name], self.configs[name]
        if self.active == name:
            self.active = None

    def delta_weight(self, name: str) -> torch.Tensor:
        """B @ A * scaling (out, in), in float32 or wider: what merging adds to the base."""
        A, B = self.lora_A[name], self.lora_B[name]
        dtype = torch.promote_types(A.dtype, torch.float32)
        return (B.to(dtype) @ A.to(dtype)) * self.configs[name].scaling

    def merge(self, name: str) -> None:
        """Add adapter `name` into the float base weight (no extra cost per token after)."""
        if isinstance(self.base, QuantizedLinear):
            raise ConfigError("cannot merge LoRA into a quantized (int4/int8) base layer: "
                              "attach the adapter to the float model and merge there")
        if name in self.merged:
            return
        if self.merged:
            raise ConfigError(f"adapter '{self.merged[0]}' is already merged: unmerge it first")
        with torch.no_grad():
            self.base.weight += self.delta_weight(name).to(self.base.weight.dtype)
        self.merged.append(name)

    def unmerge(self, name: str) -> None:
        """Subtract a merged adapter from the base weight again."""
        if name not in self.merged:
            return
        with torch.no_grad():
            self.base.weight -= self.delta_weight(name).to(self.base.weight.dtype)
        self.merged.remove(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.routing is not None:
            return self._routed(x, y, self.routing)
        name = self.active
        if name is None or name not in self.lora_A or name in self.merged:
            return y
        return self._add_lora(y, x, name)

    def _add_lora(self, y: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        """y + dropout(x) @ A.T @ B.T * scaling, as one addmm with the scaling folded into B:
        the (N, out) product goes straight into the sum, so training keeps one full-width
        temporary per layer, not four."""
        A, B = self.lora_A[name], self.lora_B[name]
        xa = F.linear(self.lora_dropout[name](x.to(A.dtype)), A).to(y.dtype)  # (..., r)
        scaled_B = (B * self.configs[name].scaling).to(y.dtype)  # (out, r)
        out = torch.addmm(y.reshape(-1, self.out_features), xa.reshape(-1, xa.shape[-1]),
                          scaled_B.t())
        return out.view(y.shape)

    def _routed(self, x: torch.Tensor, y: torch.Tensor, routing: AdapterRouting) -> torch.Tensor:
        """Each adapter applied to its own rows of the flattened batch only."""
        flat_x = x.reshape(-1, self.in_features)  # (N, in)
        if flat_x.shape[0] != routing.n_tokens:
            raise ConfigError(f"route_adapters was given {routing.n_tokens} token adapters but a "
                              f"LoRA layer saw {flat_x.shape[0]} rows: route only passes in "
                              "which every adapted layer sees every token (not MoE experts)")
        flat_y = y.reshape(-1, self.out_features)  # (N, out)
        for name, rows in routing.groups:
            if name not in self.lora_A:
                continue
            if rows is None:
                flat_y = self._add_lora(flat_y, flat_x, name)
            else:
                adapted = self._add_lora(flat_y.index_select(0, rows),
                                         flat_x.index_select(0, rows), name)
                flat_y = flat_y.index_copy(0, rows, adapted)
        return flat_y.view_as(y)

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={c.r}" for n, c in self.configs.items())
        return f"adapters=[{ranks}], active={self.active}, merged={self.merged}"


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """(name, layer) of every LoRALinear in the model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def adapter_names(model: nn.Module) -> list[str]:
    """Names of every adapter present in the model (sorted)."""
    return sorted({a for _, layer in lora_layers(model) for a in layer.adapters})


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise ConfigError(f"adapter name must be a non-empty string without '.', got {name!r}")
    if hasattr(nn.ParameterDict, name) or hasattr(nn.ModuleDict, name):
        raise ConfigError(f"adapter name {name!r} is reserved (a method of torch's containers); "
                          "pick another")


def _layers_with(model: nn.Module, name: str) -> list[tuple[str, LoRALinear]]:
    layers = [(n, m) for n, m in lora_layers(model) if name in m.lora_A]
    if not layers:
        known = ", ".join(adapter_names(model)) or "none"
        raise ModelNotFoundError(f"no LoRA adapter named '{name}' (adapters present: {known})")
    return layers


def _merged(model: nn.Module) -> set[str]:
    return {a for _, layer in lora_layers(model) for a in layer.merged}


def _targets(model: nn.Module, targets: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    """Linear-like modules whose name equals a target or ends with '.' + target (PEFT's rule)."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear | QuantizedLinear | LoRALinear)
            and not n.endswith(".base")
            and any(n == t or n.endswith("." + t) for t in targets)]


def wrap(model: nn.Module, name: str, module: nn.Module) -> LoRALinear:
    """The LoRALinear at `name`, wrapping the Linear found there in place if needed."""
    if isinstance(module, LoRALinear):
        return module
    wrapper = LoRALinear(module).train(module.training)
    model.set_submodule(name, wrapper)
    return wrapper


def add_lora(model: nn.Module, config: LoraConfig, name: str = "default") -> list[str]:
    """Add a new trainable adapter `name` to the target Linears and make it active.

    Every other parameter of the model (base weights, and other adapters) gets
    requires_grad=False, so an optimizer over `lora_parameters(model, name)` trains only it.
    Returns the names of the adapted modules."""
    _check_name(name)
    if name in adapter_names(model):
        raise ConfigError(f"adapter '{name}' already exists: pick another name or detach it")
    if _merged(model):
        raise ConfigError(f"adapter '{sorted(_merged(model))[0]}' is merged: unmerge it first")
    found = _targets(model, config.target_modules)
    if not found:
        raise ConfigError(f"no Linear layer matches LoRA target_modules {list(config.target_modules)}")
    for p in model.parameters():
        p.requires_grad_(False)
    for module_name, module in found:
        wrap(model, module_name, module).add_adapter(name, config)
    set_active_adapter(model, name)
    return [n for n, _ in found]


def lora_parameters(model: nn.Module, name: str = "default") -> list[nn.Parameter]:
    """The A and B parameters of adapter `name`, layer by layer: what an optimizer trains."""
    return [p for _, layer in _layers_with(model, name)
            for p in (layer.lora_A[name], layer.lora_B[name])]


def set_active_adapter(model: nn.Module, name: str | None) -> None:
    """Use adapter `name` in every forward pass (None: the base model alone)."""
    if name is not None:
        _layers_with(model, name)  # raises for an unknown name
    others = _merged(model) - {name}
    if others:
        raise ConfigError(f"adapter '{sorted(others)[0]}' is merged into the base weights: "
                          "unmerge it before switching adapters")
    for _, layer in lora_layers(model):
        layer.active = name


def merge_lora(model: nn.Module, name: str = "default") -> None:
    """Add adapter `name` into the base weights (and make it the active one)."""
    layers = _layers_with(model, name)
    tied = shared_parameter_ids(model)
    for layer_name, layer in layers:  # check everything before changing anything
        if isinstance(layer.base, QuantizedLinear):
            raise ConfigError(f"cannot merge LoRA into the quantized layer {layer_name}: attach "
                              "the adapter to the float model and merge there")
        if id(layer.base.weight) in tied:
            raise ConfigError(f"cannot merge LoRA into {layer_name}: its weight is tied to "
                              "another module's (merging would change both)")
    set_active_adapter(model, name)
    for _, layer in layers:
        layer.merge(name)


def unmerge_lora(model: nn.Module, name: str = "default") -> None:
    """Subtract a merged adapter from the base weights; it stays attached and active."""
    for _, layer in _layers_with(model, name):
        layer.unmerge(name)


def merge_and_unload(model: M) -> M:
    """Merge the active adapter and replace every LoRALinear by its plain base Linear.

    The result has no wrappers (ready for `save_hf_checkpoint`); other adapters are dropped.
    Parameters keep their requires_grad flags (frozen base weights stay frozen)."""
    active = {layer.active for _, layer in lora_layers(model)} - {None}
    if len(active) > 1:
        raise ConfigError(f"layers disagree on the active adapter ({sorted(active)})")
    if active:
        merge_lora(model, active.pop())
    for layer_name, layer in lora_layers(model):
        model.set_submodule(layer_name, layer.base)
    return model


def detach_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` (unmerging it if merged); layers left with no adapter are unwrapped
    back to their base Linear, so detaching the last adapter restores the original model."""
    for layer_name, layer in _layers_with(model, name):
        layer.remove_adapter(name)
        if not layer.adapters:
            model.set_submodule(layer_name, layer.base)


@contextmanager
def route_adapters(model: nn.Module, token_adapters: list[str | None]) -> Iterator[AdapterRouting]:
    """Within the block, token i of the flattened (B*T) input uses adapter token_adapters[i]
    (None: the base model alone), in every LoRA layer, for batches that mix requests.

    The rows of each adapter are grouped once here into index tensors that all layers share;
    a layer then runs each adapter on its rows only (index_select / index_add)."""
    layers = lora_layers(model)
    present = set(adapter_names(model))
    unknown = sorted({a for a in token_adapters if a is not None} - present)
    if unknown:
        raise ModelNotFoundError(f"no LoRA adapter named '{unknown[0]}' (adapters present: "
                                 f"{', '.join(sorted(present)) or 'none'})")
    if _merged(model):
        raise ConfigError(f"adapter '{sorted(_merged(model))[0]}' is merged into the base weights:"
                          " unmerge it before routing adapters per token")
    rows: dict[str, list[int]] = {}
    for i, adapter in enumerate(token_adapters):
        if adapter is not None:
            rows.setdefault(adapter, []).append(i)
    device = layers[0][1].lora_A[layers[0][1].adapters[0]].device if layers else None
    n = len(token_adapters)
    routing = AdapterRouting(n, [(a, None if len(r) == n else torch.tensor(r, device=device))
                                 for a, r in rows.items()])
    previous = [layer.routing for _, layer in layers]
    for _, layer in layers:
        layer.routing = routing
    try:
        yield routing
    finally:
        for (_, layer), before in zip(layers, previous, strict=True):
            layer.routing = before




# --- PEFT's file layout ---------------------------------------------------------------------
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model
_PEFT_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")
_NAME_FAMILIES = ("llama", "gpt2", "bert")  # the name tables of hf_checkpoint
# PEFT options that change what the adapter computes and that Pagoda does not implement: each
# must be absent or empty/false in adapter_config.json.
_UNSUPPORTED = ("use_dora", "lora_bias", "use_qalora", "modules_to_save", "layers_to_transform",
                "layer_replication", "rank_pattern", "alpha_pattern", "trainable_token_indices",
                "alora_invocation_tokens", "target_parameters", "use_bdlora", "arrow_config",
                "kasa_config", "velora_config", "monteclora_config", "megatron_config")
# init schemes that rewrite the base weights too: the adapter alone does not reproduce them
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


@dataclass
class LoraAdapter:
    """An adapter read from disk: its config and (A, B) per module, keyed by Pagoda's names."""

    config: LoraConfig
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A (r, in), B (out, r))
    hf_names: dict[str, str]  # module -> the Hugging Face module name it was saved under
    family: str  # which name table mapped the names: "llama", "gpt2" or "bert"
    base_model: str = ""
    source: str = ""


def _hf_module(module: str, arch: str) -> str | None:
    hf = hf_tensor_name(module + ".weight", arch)
    return hf.removesuffix(".weight") if hf else None


def _peft_targets(model: nn.Module, hf_modules: list[str], arch: str) -> list[str]:
    """PEFT target_modules: the name suffixes when they select exactly the adapted modules,
    else the full Hugging Face module names (PEFT matches those exactly)."""
    suffixes = sorted({m.rsplit(".", 1)[-1] for m in hf_modules})
    candidates = {hf for n, m in model.named_modules()
                  if isinstance(m, nn.Linear | QuantizedLinear | LoRALinear)
                  and not n.endswith(".base")
                  and (hf := _hf_module(n, arch)) and hf.rsplit(".", 1)[-1] in suffixes}
    return suffixes if candidates == set(hf_modules) else sorted(hf_modules)


def save_adapter(model: nn.Module, folder: str | Path, name: str = "default",
                 base_model: str = "") -> Path:
    """Write adapter `name` as PEFT does (adapter_config.json + adapter_model.safetensors with
    Hugging Face module names), each file atomically; returns the folder."""
    layers = _layers_with(model, name)
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        raise ConfigError("save_adapter needs a pagoda Transformer (its cfg names the layers)")
    tensors: dict[str, torch.Tensor] = {}
    hf_modules = []
    for module, layer in layers:
        hf = _hf_module(module, cfg.arch)
        if hf is None:
            raise WeightsError(f"{module} has no Hugging Face module of its own in a {cfg.arch} "
                               "model (GPT-2 fuses q/k/v into c_attn), so PEFT could not load "
                               "a LoRA on it: leave it out of target_modules")
        hf_modules.append(hf)
        for part in "AB":
            param = getattr(layer, f"lora_{part}")[name]
            tensors[f"{PEFT_PREFIX}{hf}.lora_{part}.weight"] = param.detach().cpu().contiguous()
    config = layers[0][1].configs[name]
    alpha = int(config.alpha) if float(config.alpha).is_integer() else config.alpha
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM" if cfg.lm_head else "FEATURE_EXTRACTION",
        "base_model_name_or_path": base_model or None, "revision": None, "inference_mode": True,
        "r": config.r, "lora_alpha": alpha, "lora_dropout": config.dropout,
        "target_modules": _peft_targets(model, hf_modules, cfg.arch), "exclude_modules": None,
        "fan_in_fan_out": cfg.arch == "gpt2",  # PEFT's flag for GPT-2's Conv1D base layers
        "bias": "none", "use_rslora": config.use_rslora, "use_dora": False, "lora_bias": False,
        "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "layer_replication": None,
        "megatron_config": None, "megatron_core": "megatron.core", "loftq_config": {},
        "auto_mapping": None,
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_json(folder / ADAPTER_CONFIG, peft_config)
    atomic_safetensors(tensors, folder / ADAPTER_WEIGHTS, {"format": "pt"})
    fsync_path(folder)
    return folder


def _config_from_peft(data: dict, where: Path) -> LoraConfig:
    """Validate a PEFT adapter_config.json and turn it into a LoraConfig."""
    if data.get("peft_type") != "LORA":
        raise WeightsError(f"{where}: peft_type is {data.get('peft_type')!r}; only LORA "
                           "adapters are supported")
    for option in _UNSUPPORTED:
        if data.get(option):
            raise WeightsError(f"{where}: {option}={data[option]!r} is not supported by Pagoda's "
                               "LoRA (only plain LoRA adapters load)")
    if data.get("bias", "none") != "none":
        raise WeightsError(f"{where}: bias={data['bias']!r} is not supported (trained biases); "
                           "only bias='none' adapters load")
    init = data.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise WeightsError(f"{where}: init_lora_weights={init!r} also changes the base weights; "
                           "convert the adapter to plain LoRA with PEFT first")
    targets = data.get("target_modules") or DEFAULT_TARGETS
    try:
        return LoraConfig(r=data.get("r", 8), alpha=float(data.get("lora_alpha", 8)),
                          dropout=float(data.get("lora_dropout", 0.0) or 0.0),
                          target_modules=tuple([targets] if isinstance(targets, str) else targets),
                          use_rslora=bool(data.get("use_rslora", False)))
    except (ConfigError, TypeError, ValueError) as exc:
        raise WeightsError(f"{where}: {exc}") from exc


def _name_family(hf_modules: list[str]) -> str | None:
    """The name table under which every module has a Pagoda name."""
    for family in _NAME_FAMILIES:
        if all(_hf_to_module(m, family) for m in hf_modules):
            return family
    return None


def _hf_to_module(hf_module: str, family: str) -> str | None:
    ours = pagoda_tensor_name(hf_module + ".weight", family)
    return ours.removesuffix(".weight") if ours else None


def load_adapter(folder: str | Path) -> LoraAdapter:
    """Read and validate a PEFT LoRA adapter folder; tensors are renamed onto Pagoda's modules."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelNotFoundError(f"adapter folder {folder} does not exist")
    if not (folder / ADAPTER_CONFIG).is_file():
        raise WeightsError(f"{folder} has no {ADAPTER_CONFIG}: not a PEFT adapter folder")
    if not (folder / ADAPTER_WEIGHTS).is_file():
        hint = (" (only safetensors adapters load; save with safe_serialization=True)"
                if (folder / "adapter_model.bin").exists() else "")
        raise WeightsError(f"{folder} has no {ADAPTER_WEIGHTS}{hint}")
    data = _read_json(folder / ADAPTER_CONFIG)
    if not isinstance(data, dict):
        raise WeightsError(f"{folder / ADAPTER_CONFIG} is not a JSON object")
    config = _config_from_peft(data, folder / ADAPTER_CONFIG)
    try:
        raw = load_file(folder / ADAPTER_WEIGHTS)
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"{folder / ADAPTER_WEIGHTS} is truncated or corrupt ({exc})") from exc
    parts: dict[str, dict[str, torch.Tensor]] = {}
    stray = []
    for key, tensor in raw.items():
        m = _PEFT_KEY.match(key)
        if m:
            parts.setdefault(m.group(1), {})[m.group(2)] = tensor
        else:
            stray.append(key)
    if stray or not parts:
        raise WeightsError(f"{folder / ADAPTER_WEIGHTS}: " + (
            f"{len(stray)} tensors are not LoRA A/B weights, e.g. {', '.join(sorted(stray)[:3])}"
            if stray else "holds no LoRA weights"))
    family = _name_family(sorted(parts))
    if family is None:
        odd = next(m for m in sorted(parts) if not any(_hf_to_module(m, f) for f in _NAME_FAMILIES))
        raise WeightsError(f"{folder}: module {odd} has no equivalent in Pagoda's models")
    tensors, hf_names = {}, {}
    for hf, ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise WeightsError(f"{folder}: {hf} has lora_{''.join(ab)} but not both lora_A and lora_B")
        A, B = ab["A"], ab["B"]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != config.r or B.shape[1] != config.r:
            raise WeightsError(f"{folder}: {hf} has lora_A {tuple(A.shape)} and lora_B "
                               f"{tuple(B.shape)}, not rank r={config.r} matrices")
        module = _hf_to_module(hf, family)
        tensors[module], hf_names[module] = (A, B), hf
    # PEFT's target_modules use HF names; ours name exactly the modules the tensors adapt, so
    # add_lora(model, adapter.config) would place a fresh adapter on the same layers
    config.target_modules = tuple(sorted(tensors))
    return LoraAdapter(config, tensors, hf_names, family,
                       base_model=data.get("base_model_name_or_path") or "", source=str(folder))


def attach_adapter(model: nn.Module, adapter: LoraAdapter, name: str) -> None:
    """Add a loaded adapter to the model as `name` (not made active; frozen: requires_grad
    False). Every tensor is checked against the model's layers before anything changes."""
    _check_name(name)
    if name in adapter_names(model):
        raise ConfigError(f"adapter '{name}' already exists: detach it first or pick another name")
    arch = model.cfg.arch if hasattr(model, "cfg") else None
    source = adapter.source or "adapter"
    found = []
    for module_name, (A, B) in adapter.tensors.items():
        if arch is not None and _hf_module(module_name, arch) != adapter.hf_names[module_name]:
            raise WeightsError(f"{source} was saved for {adapter.hf_names[module_name]}, which "
                               f"is not {module_name} of this {arch} model: wrong base model")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            raise WeightsError(f"{source}: the model has no layer {module_name}") from None
        if not isinstance(module, nn.Linear | QuantizedLinear | LoRALinear):
            raise WeightsError(f"{source}: {module_name} is a {type(module).__name__}, "
                               "not a Linear layer")
        want_a = (adapter.config.r, module.in_features)
        want_b = (module.out_features, adapter.config.r)
        if tuple(A.shape) != want_a or tuple(B.shape) != want_b:
            raise WeightsError(f"{source}: {module_name} has lora_A {tuple(A.shape)} and lora_B "
                               f"{tuple(B.shape)}, the model needs {want_a} and {want_b}: "
                               "the adapter was trained on another base model")
        found.append((module_name, module, A, B))
    for module_name, module, A, B in found:
        wrap(model, module_name, module).add_adapter(name, adapter.config, A, B, trainable=False)
