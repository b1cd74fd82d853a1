"""timm backbones, offline: their weights, preprocessing, and the frozen/trainable split.

A timm architecture (any name ``timm.list_models`` knows, with its keyword arguments) is loaded with weights from
a local file (safetensors, or a state dict read with ``weights_only``), from a folder holding a hub snapshot
(``config.json`` and ``model.safetensors`` or ``pytorch_model.bin``), or from a Hugging Face hub id
(``hf-hub:ORG/NAME``) looked up in the local cache only: nothing is ever downloaded. Where the model's
configuration gives its preprocessing (input size, mean and std, interpolation), tiles get it.

Two splits (``FeatureSettings.trainable``):

- ``embedding`` (the default for timm models): the cache holds the frozen pooled embedding (D values a patch); the
  trainable part is a linear map initialised to the identity, so the pretrained retrieval embedding is the model's
  own and training learns a metric on it. Works for any timm model.
- ``last``: the paper's split carried over to vision transformers: the cache holds the tokens entering the last
  block (T x D values a patch), and the last block, the final norm and the model's pooling train. timm
  ``VisionTransformer`` models only.

The trainable part carries its own description (a ``tail_spec`` buffer: the JSON of its kind, architecture and
arguments), so that ``wsi_il.heads`` rebuilds it from a saved state alone.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_il.errors import InputError, WeightsError

HUB_PREFIX = "hf-hub:"
TIMM_TRAINABLE = ("embedding", "last")
DEFAULT_TIMM_TRAINABLE = "embedding"
"""The timm default: a store of a few kB a patch, where ``last`` holds hundreds (docs/backbones.md)."""
TAIL_SPEC = "tail_spec"
"""The key of a trainable part's description in its state."""
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
"""The weights a hub snapshot folder may hold, in the order they are looked for."""
STORE_MARGIN_BYTES = 1 << 30
"""Free disk a feature store must leave (models, embeddings and batches are written beside it)."""
_KEPT_IN_TAIL = ("blocks", "norm", "fc_norm", "attn_pool", "head_drop")


@dataclass(frozen=True)
class Preprocessing:
    """How tiles are prepared for a model: its input side, normalisation and resize filter."""

    input_px: int
    mean: list[float]
    std: list[float]
    interpolation: str
    """'bilinear' or 'bicubic' (antialiased, the filters torch resizes with)."""


def is_timm(arch: str) -> bool:
    """Whether an architecture name is a timm one (the torchvision ResNets keep their own names)."""
    from wsi_il.features import ARCHES

    return arch not in ARCHES


def _timm():
    try:
        import timm
    except ImportError as exc:
        raise WeightsError(
            "timm is not installed, and --arch names a timm model",
            "install it with `pip install 'wsi-il[timm]'` (or `pip install timm`)",
        ) from exc
    return timm


def check_arch(arch: str) -> str:
    """Return a timm architecture name when timm knows it, else raise a WeightsError."""
    timm = _timm()
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:5]
        raise WeightsError(
            f"--arch {arch!r} is neither resnet18/34/50 nor a timm architecture",
            "name one from `python -c \"import timm; print(timm.list_models('vit*'))\"`"
            + (f", e.g. {', '.join(close)}" if close else ""),
        )
    return arch


def parse_args(text: str | None) -> dict[str, Any]:
    """Read ``--arch-args`` (a JSON object of keyword arguments for ``timm.create_model``)."""
    if not text:
        return {}
    try:
        args = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(
            f"--arch-args {text!r} is not JSON ({exc.msg} at character {exc.pos})",
            "give an object, e.g. --arch-args '{\"init_values\": 1e-5}'",
        ) from exc
    if not isinstance(args, dict):
        raise InputError(f"--arch-args {text!r} is not a JSON object", "e.g. --arch-args '{\"init_values\": 1e-5}'")
    return args


def hub_cache_dir() -> Path:
    """The local Hugging Face hub cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


def hub_snapshot(repo: str) -> Path:
    """The folder of a hub repository's cached snapshot (its ``main`` revision), found without the network."""
    from huggingface_hub import try_to_load_from_cache

    cache = hub_cache_dir()
    where = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / "REVISION"
    for name in ("config.json", *WEIGHT_FILES):
        found = try_to_load_from_cache(repo, name, cache_dir=str(cache))
        if isinstance(found, str):
            return Path(found).parent
    raise WeightsError(
        f"{HUB_PREFIX}{repo} is not in the local hub cache ({cache}); nothing is downloaded",
        f"on a machine with access, run `hf download {repo}` and copy "
        f"{cache / ('models--' + repo.replace('/', '--'))} here (config.json and the weights must be "
        f"in {where}), or set HF_HUB_CACHE to the cache that holds it",
    )


def snapshot_config(folder: Path) -> dict[str, Any]:
    """The timm configuration (``config.json``) of a snapshot folder."""
    path = folder / "config.json"
    if not path.is_file():
        raise WeightsError(
            f"{folder} holds no config.json",
            "give the folder of a timm hub snapshot, or the weights file itself with --arch and --arch-args",
        )
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{path} cannot be read as JSON ({exc})", "copy the snapshot again") from exc
    if not isinstance(config, dict) or "architecture" not in config:
        raise WeightsError(
            f"{path} names no timm architecture (no 'architecture' key)",
            "this is not a timm model: give its weights file with --arch and --arch-args",
        )
    return config


def snapshot_weights(folder: Path) -> Path:
    """The weights file of a snapshot folder."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise WeightsError(
        f"{folder} holds none of {', '.join(WEIGHT_FILES)}",
        "copy the whole snapshot (the weights are stored beside config.json)",
    )


_PREPROCESSING_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")
"""What of a hub configuration's ``pretrained_cfg`` is kept: the preprocessing."""


def _pretrained_cfg(config: dict[str, Any]) -> dict[str, Any]:
    """A hub configuration's ``pretrained_cfg``; in the older single-object form, the object itself (as timm
    reads both)."""
    if isinstance(config.get("pretrained_cfg"), dict):
        return config["pretrained_cfg"]
    return {k: v for k, v in config.items() if k not in ("architecture", "num_features", "model_args")}


@dataclass(frozen=True)
class TimmChoice:
    """A timm model as init resolves it: architecture, keyword arguments, where its weights are."""

    arch: str
    args: dict[str, Any]
    weights_file: Path | None
    """None for --weights random."""
    recorded: str
    """What the project records as its weights: 'hf-hub:ORG/NAME', an absolute path, or 'random'."""
    mpp: float | None = None
    """The resolution the model was trained at, where known (``KNOWN_MPP``)."""


KNOWN_MPP = {
    "MahmoodLab/UNI": 0.5,
    "MahmoodLab/UNI2-h": 0.5,
    "paige-ai/Virchow2": 0.5,
    "paige-ai/Virchow": 0.5,
    "bioptimus/H-optimus-0": 0.5,
    "bioptimus/H-optimus-1": 0.5,
    "bioptimus/H0-mini": 0.5,
    "prov-gigapath/prov-gigapath": 0.5,
}
"""µm/px each public pathology model was trained at, by hub id (docs/backbones.md says where each figure comes
from): a project made with one tiles at it unless told otherwise."""


def choose_timm(spec: str, arch: str | None, args: dict[str, Any]) -> TimmChoice:
    """Resolve ``--weights`` with ``--arch``/``--arch-args`` for a timm model (nothing is loaded yet)."""
    if spec == "imagenet":
        raise WeightsError(
            f"--weights imagenet is for the torchvision ResNets, not --arch {arch}",
            "give a weights file, a snapshot folder or hf-hub:ORG/NAME from the local cache",
        )
    if spec == "random":
        if arch is None:
            raise WeightsError("--weights random needs --arch", "e.g. --arch vit_small_patch16_224")
        return TimmChoice(check_arch(arch), args, None, "random")
    repo = spec[len(HUB_PREFIX) :] if spec.startswith(HUB_PREFIX) else None
    folder = hub_snapshot(repo) if repo else (Path(spec) if Path(spec).is_dir() else None)
    if folder is None:
        path = Path(spec)
        if not path.is_file():
            raise WeightsError(f"weights {spec} is neither a file, a folder nor {HUB_PREFIX}ORG/NAME", "check the path")
        if arch is None:
            raise WeightsError(
                f"{path} is a timm model's weights file without its configuration",
                "name its architecture with --arch (and --arch-args), or give the snapshot folder",
            )
        return TimmChoice(check_arch(arch), args, path, str(path.resolve()))
    config = snapshot_config(folder)
    if arch is not None and arch != config["architecture"]:
        raise WeightsError(f"{spec} is a {config['architecture']}, not --arch {arch}", "leave --arch out")
    merged = {**config.get("model_args", {}), **args}
    preprocessing = {k: v for k, v in _pretrained_cfg(config).items() if k in _PREPROCESSING_KEYS}
    if preprocessing:
        merged.setdefault("pretrained_cfg_overlay", preprocessing)
    return TimmChoice(
        check_arch(config["architecture"]),
        merged,
        snapshot_weights(folder),
        f"{HUB_PREFIX}{repo}" if repo else str(folder.resolve()),
        KNOWN_MPP.get(repo or ""),
    )


def weights_of(choice: TimmChoice):
    """Load a choice's weights (``features.Weights``)."""
    from wsi_il.features import Weights, load_weights_file

    if choice.weights_file is None:
        return Weights(None, "random", "random", None)
    weights = load_weights_file(choice.weights_file)
    if choice.recorded.startswith(HUB_PREFIX):
        return Weights(weights.state, "hub", f"{choice.recorded} ({choice.weights_file})", weights.sha256)
    return weights


def create(arch: str, args: dict[str, Any]):
    """A timm model without its classifier, randomly initialised (``pretrained=False``: never downloaded)."""
    timm = _timm()
    try:
        return timm.create_model(arch, pretrained=False, **{**_resolved(args), "num_classes": 0})
    except (TypeError, ValueError, RuntimeError, AssertionError) as exc:
        raise WeightsError(
            f"timm cannot build {arch} with {json.dumps(args)} ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:160]})",
            "check --arch-args",
        ) from exc


_LAYER_ARGS = ("mlp_layer", "embed_layer", "block_fn")
"""Keyword arguments timm takes as classes only: given by name in JSON (``"mlp_layer": "SwiGLUPacked"``). (timm
resolves ``act_layer`` and ``norm_layer`` names, such as 'silu', itself.)"""


def _resolved(args: dict[str, Any]) -> dict[str, Any]:
    """``args`` with the layer classes named as strings replaced by timm's classes of that name."""
    import timm.layers
    import timm.models.vision_transformer

    resolved = dict(args)
    for key in _LAYER_ARGS:
        name = resolved.get(key)
        if isinstance(name, str):
            found = getattr(timm.layers, name, None) or getattr(timm.models.vision_transformer, name, None)
            if found is None:
                raise WeightsError(
                    f"--arch-args {key} {name!r} names no timm layer", 'e.g. "mlp_layer": "SwiGLUPacked"'
                )
            resolved[key] = found
    return resolved


def build_timm(arch: str, args: dict[str, Any], weights: Any, seed: int):
    """Build a timm model with the given weights (seeded init when random), refusing weights that do not fit."""
    import torch

    torch.manual_seed(seed)
    model = create(arch, args)
    if weights.state is not None:
        expected = model.state_dict()
        state = {k: v for k, v in weights.state.items() if k in expected or not _classifier_key(model, k)}
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        misshapen = sorted(
            k for k in set(state) & set(expected) if tuple(getattr(state[k], "shape", ())) != tuple(expected[k].shape)
        )
        if missing or unexpected or misshapen:
            raise WeightsError(
                f"{weights.source} does not fit {arch} {json.dumps(args)}: {len(missing)} missing keys (e.g. "
                f"{missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}), {len(misshapen)} of another "
                f"shape (e.g. {misshapen[:2]})",
                "give the architecture and the arguments the model was trained with (docs/backbones.md lists them "
                "for the public pathology models: img_size, init_values, reg_tokens, mlp_layer ...)",
            )
        model.load_state_dict(state)
    model.wsi_il_spec = {"arch": arch, "args": args}
    return model.eval()


def _classifier_key(model: Any, key: str) -> bool:
    """Whether a state key belongs to the model's classifier (dropped: the heads replace it)."""
    names = model.pretrained_cfg.get("classifier") or "head"
    names = names if isinstance(names, list | tuple) else [names]
    return any(key.startswith(f"{name}.") for name in names)


def preprocessing_of(model: Any) -> Preprocessing:
    """The preprocessing a timm model's configuration gives (tiles are resized whole to its input side: a tile is
    what the pathologist labels, so nothing of it is cropped away)."""
    from timm.data import resolve_data_config

    config = resolve_data_config({}, model=model)
    interpolation = "bilinear" if config.get("interpolation") == "bilinear" else "bicubic"
    input_px = int(config["input_size"][-1])
    fixed = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if fixed and not getattr(model, "dynamic_img_size", False):  # a ViT built for one size takes only that size
        input_px = int(fixed[-1])
    return Preprocessing(input_px, [float(v) for v in config["mean"]], [float(v) for v in config["std"]], interpolation)


def check_trainable(model: Any, trainable: str) -> str:
    """Return ``trainable`` when the model supports that split, else raise an InputError."""
    if trainable not in TIMM_TRAINABLE:
        raise InputError(
            f"--trainable {trainable} is not one of {', '.join(TIMM_TRAINABLE)} for a timm model",
            "use --trainable embedding (the default) or --trainable last",
        )
    if trainable == "last":
        from timm.models.vision_transformer import VisionTransformer

        if not isinstance(model, VisionTransformer):
            raise InputError(
                f"--trainable last needs a timm VisionTransformer, and {type(model).__name__} is not one",
                "use --trainable embedding (the frozen embedding and the heads on it)",
            )
    return trainable


def _nn():
    import torch

    return torch.nn


class EmbeddingTrunk(_nn().Module):
    """The whole frozen model up to its pooled embedding (``forward_head(..., pre_logits=True)``)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


class TokenTrunk(_nn().Module):
    """A vision transformer up to the tokens entering its last block (what ``forward_features`` computes first)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model
        self.blocks = model.blocks[:-1]

    def forward(self, x):
        model = self.model
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        return self.blocks(x)


def trunk_of(model: Any, trainable: str):
    """The frozen part of a timm model for a split (its parameters frozen, in eval mode)."""
    check_trainable(model, trainable)
    trunk = EmbeddingTrunk(model) if trainable == "embedding" else TokenTrunk(model)
    for param in trunk.parameters():
        param.requires_grad_(False)
    return trunk.eval()


class EmbeddingTail(_nn().Module):
    """The trainable part on a cached embedding: a linear map, the identity to begin with."""

    def __init__(self, width: int, spec: Any) -> None:
        super().__init__()
        nn = _nn()
        self.linear = nn.Linear(width, width)
        if not self.linear.weight.is_meta:
            nn.init.eye_(self.linear.weight)
            nn.init.zeros_(self.linear.bias)
        self.register_buffer(TAIL_SPEC, spec)

    def forward(self, x):
        return self.linear(x)


class TokenTail(_nn().Module):
    """The trainable part on cached tokens: a vision transformer's last block, final norm and pooling.

    Built from the whole model with everything else taken out (so that the model's own pooling, class token or
    average, register tokens skipped, runs as it does in timm).
    """

    def __init__(self, model: Any, spec: Any) -> None:
        super().__init__()
        nn = _nn()
        model.blocks = nn.Sequential(model.blocks[-1])
        for name in list(model._modules):
            if name not in _KEPT_IN_TAIL:
                setattr(model, name, nn.Identity())
        for name in list(model._parameters):
            model._parameters[name] = None
        for name in list(model._buffers):
            model._buffers[name] = None
        self.shell = model
        self.register_buffer(TAIL_SPEC, spec)

    def forward(self, x):
        shell = self.shell
        return shell.forward_head(shell.norm(shell.blocks(x)), pre_logits=True)


def _spec_tensor(spec: dict[str, Any]):
    import torch

    return torch.tensor(list(json.dumps(spec, sort_keys=True).encode()), dtype=torch.uint8)


def read_spec(state: dict[str, Any]) -> dict[str, Any]:
    """The description a trainable part's state carries."""
    return json.loads(bytes(state[TAIL_SPEC].tolist()).decode())


def _empty_tail(spec: dict[str, Any], spec_tensor: Any):
    """A trainable part shaped by ``spec``, its weights not set (on the meta device)."""
    import torch

    with torch.device("meta"):
        if spec["kind"] == "embedding":
            tail = EmbeddingTail(int(spec["width"]), spec_tensor)
        else:
            tail = TokenTail(create(spec["arch"], spec["args"]), spec_tensor)
    return tail


def make_tail(state: dict[str, Any]):
    """The trainable part a state describes, holding that state (``wsi_il.heads.make_block`` for timm models)."""
    tail = _empty_tail(read_spec(state), state[TAIL_SPEC]).to_empty(device="cpu")
    tail.load_state_dict(state)
    return tail


def tail_width(state: dict[str, Any]) -> int:
    """The width of the trainable part's output (the embedding size)."""
    return int(read_spec(state)["width"])


def init_tail(model: Any, trainable: str):
    """The trainable part of a timm model for a split, holding the model's weights (what every round starts from)."""
    check_trainable(model, trainable)
    spec = {
        "kind": "embedding" if trainable == "embedding" else "tokens",
        "arch": model.wsi_il_spec["arch"],
        "args": model.wsi_il_spec["args"],
        "width": int(model.num_features),
    }
    if trainable == "embedding":
        return EmbeddingTail(spec["width"], _spec_tensor(spec))
    tail = _empty_tail(spec, _spec_tensor(spec)).to_empty(device="cpu")
    source = model.state_dict()
    last = f"blocks.{len(model.blocks) - 1}."
    state = {}
    for key in tail.state_dict():
        if key == TAIL_SPEC:
            state[key] = _spec_tensor(spec)
            continue
        name = key[len("shell.") :]
        state[key] = source[last + name[len("blocks.0.") :] if name.startswith("blocks.0.") else name]
    tail.load_state_dict(state)
    return tail


def trunk_output_shape(trunk: Any, input_px: int) -> tuple[int, ...]:
    """The shape of one patch's cached features (a zero tile through the trunk)."""
    import torch

    with torch.inference_mode():
        return tuple(trunk(torch.zeros(1, 3, input_px, input_px)).shape[1:])


def bytes_per_patch(shape: tuple[int, ...] | list[int]) -> int:
    """Bytes a patch takes in the feature store (float16)."""
    return int(np.prod(shape)) * 2


def check_store_fits(folder: Path, patches: int, shape: tuple[int, ...] | list[int], trainable: str) -> None:
    """Refuse a feature store that would not fit the free disk of ``folder`` (with ``STORE_MARGIN_BYTES`` to spare)."""
    need = patches * bytes_per_patch(shape)
    free = shutil.disk_usage(folder).free
    if need + STORE_MARGIN_BYTES > free:
        hint = ("use --trainable embedding (a few kB a patch), " if trainable == "last" else "") + (
            "free space, or put the project on a larger disk"
        )
        raise InputError(
            f"the feature store would need {_size(need)} ({patches:,} patches x "
            f"{_size(bytes_per_patch(shape))}, --trainable {trainable}) and {folder} has {_size(free)} "
            f"free ({_size(STORE_MARGIN_BYTES)} kept spare)",
            hint,
        )


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def timm_feature_settings(choice: TimmChoice, weights: Any, trainable: str | None, batch_size: int, seed: int):
    """The ``FeatureSettings`` of a new project on a timm model (built here once: weights that do not fit, or a
    split the model does not support, are refused before anything is written)."""
    from wsi_il.config import FeatureSettings

    model = build_timm(choice.arch, choice.args, weights, seed)
    trainable = check_trainable(model, trainable or DEFAULT_TIMM_TRAINABLE)
    prep = preprocessing_of(model)
    shape = trunk_output_shape(trunk_of(model, trainable), prep.input_px)
    if trainable == "embedding" and len(shape) != 1:
        raise InputError(
            f"{choice.arch} pools nothing (its embedding is {list(shape)} a tile)",
            'name its pooling, e.g. --arch-args \'{"global_pool": "token"}\' (the class token) or '
            '"avg" (the mean of the patch tokens)',
        )
    return FeatureSettings(
        arch=choice.arch,
        arch_args=choice.args,
        weights=choice.recorded,
        weights_sha256=weights.sha256,
        input_px=prep.input_px,
        interpolation=prep.interpolation,
        mean=prep.mean,
        std=prep.std,
        feature_shape=list(shape),
        batch_size=batch_size,
        seed=seed,
        trainable=trainable,
    )
