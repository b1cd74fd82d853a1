"""The frozen trunk, its weights, and batched feature extraction.

Per architecture the split is the same: the last residual block of ``layer4`` is trainable (the
heads), everything before it is the frozen trunk whose output (C x 7 x 7) is cached. For ResNet-18
that is docs/method.md's split (trunk up to ``layer4[0]``, heads from ``layer4[1]``).

``FeatureSettings.trainable == "layer4"`` is docs/method.md's ablation: the whole of ``layer4`` is trainable and
the cache stops after ``layer3`` (256 x 14 x 14 for ResNet-18/34, 1024 x 14 x 14 for ResNet-50).
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wsi_il.errors import InputError, WeightsError
from wsi_il.precision import GRAPHS_ENV, autocast, cuda_graphs_wanted, precision_name
from wsi_il.threads import core_threads, default_workers

if TYPE_CHECKING:
    from wsi_il.config import FeatureSettings

_PREFIXES = ("module.", "backbone.", "encoder.", "model.", "trunk.", "resnet.", "net.")


@dataclass(frozen=True)
class Arch:
    """A supported backbone: its torchvision builder, cached feature channels and ImageNet weights."""

    name: str
    channels: int
    imagenet: str  # the torchvision weights enum member


ARCHES = {
    "resnet18": Arch("resnet18", 512, "ResNet18_Weights.IMAGENET1K_V1"),
    "resnet34": Arch("resnet34", 512, "ResNet34_Weights.IMAGENET1K_V1"),
    "resnet50": Arch("resnet50", 2048, "ResNet50_Weights.IMAGENET1K_V1"),
}


def get_arch(name: str) -> Arch:
    """Return a supported architecture by name."""
    if name not in ARCHES:
        raise WeightsError(f"architecture {name!r} is not supported", f"use one of {', '.join(ARCHES)}")
    return ARCHES[name]


TRAINABLE = ("last", "layer4")
"""What the heads train: the last block of layer4 (the paper) or the whole of layer4 (docs/method.md's ablation)."""


def check_trainable(trainable: str) -> str:
    """Return ``trainable`` when it names a known split of a ResNet, else raise an InputError (a timm model's:
    ``backbones.check_trainable``)."""
    if trainable not in TRAINABLE:
        raise InputError(
            f"trainable part {trainable!r} is not one of {', '.join(TRAINABLE)}",
            "use --trainable last (the paper) or --trainable layer4",
        )
    return trainable


def store_shape(settings: Any) -> tuple[int, ...]:
    """Shape of one patch's cached features under ``FeatureSettings`` (recorded at init for timm models)."""
    if settings.feature_shape:
        return tuple(settings.feature_shape)
    return feature_shape(settings.arch, settings.trainable)


def build_backbone(weights: Weights, settings: Any):
    """Build the backbone ``FeatureSettings`` names (a torchvision ResNet or a timm model) with ``weights``."""
    if settings.arch in ARCHES:
        return build_resnet(weights, settings.seed, settings.arch)
    from wsi_il.backbones import build_timm

    return build_timm(settings.arch, settings.arch_args or {}, weights, settings.seed)


def feature_shape(arch: str, trainable: str = "last") -> tuple[int, int, int]:
    """Shape of one cached feature map for an architecture (after layer3 when all of layer4 trains)."""
    channels = get_arch(arch).channels
    if check_trainable(trainable) == "layer4":
        return (channels // 2, 14, 14)
    return (channels, 7, 7)


def detect_arch(state: dict[str, Any]) -> str | None:
    """Guess the ResNet a state dict belongs to from its keys (None when it is no known ResNet)."""
    if "layer4.0.conv3.weight" in state:
        blocks = {k.split(".")[1] for k in state if k.startswith("layer3.")}
        return "resnet50" if len(blocks) == 6 else None
    if "layer4.0.conv1.weight" in state:
        blocks = {k.split(".")[1] for k in state if k.startswith("layer3.")}
        return {2: "resnet18", 6: "resnet34"}.get(len(blocks))
    return None


@dataclass(frozen=True)
class Weights:
    """Backbone weights and where they came from."""

    state: dict[str, Any] | None
    kind: str  # "imagenet", "file" or "random"
    source: str
    sha256: str | None

    def describe(self) -> str:
        if self.kind == "random":
            return "RANDOM initialisation (no pretrained weights: retrieval quality will be poor)"
        return f"{self.kind}: {self.source} (sha256 {str(self.sha256)[:12]})"


def file_sha256(path: Path) -> str:
    """Return the SHA-256 hex digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_weights(spec: str, arch: str = "resnet18") -> Weights:
    """Load the weights named by ``spec``: 'imagenet', 'random', or a state-dict file."""
    if spec == "random":
        return Weights(None, "random", "random", None)
    if spec == "imagenet":
        return _imagenet_weights(get_arch(arch))
    return load_weights_file(Path(spec))


def _imagenet_weights(arch: Arch) -> Weights:
    import torch
    import torchvision.models as tvm

    enum_name, member = arch.imagenet.split(".")
    spec = getattr(getattr(tvm, enum_name), member)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(spec.url).name
    try:
        state = spec.get_state_dict(progress=False)
    except Exception as exc:
        raise WeightsError(
            f"the ImageNet weights of {arch.name} are not in torch's cache ({cached}) and could not be "
            f"downloaded ({type(exc).__name__}: {str(exc)[:120]})",
            "offline, pass --weights pretrain (learns the backbone from your slides in a few minutes, no labels); "
            f"or, from a machine with internet, copy {spec.url} to {cached}; or pass --weights FILE (your lab's "
            "weights)",
        ) from exc
    sha = file_sha256(cached) if cached.is_file() else None
    return Weights(dict(state), "imagenet", f"torchvision {arch.imagenet}", sha)


def load_weights_file(path: Path) -> Weights:
    """Load a state dict from a file: safetensors, or torch's format read with ``weights_only``."""
    if not path.is_file():
        raise WeightsError(
            f"weights file {path} does not exist",
            "give a state dict saved with torch.save(model.state_dict(), PATH), 'imagenet' or 'random'",
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            import torch

            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise WeightsError(
            f"{path} holds pickled Python objects; only plain tensors are loaded",
            "save the weights with torch.save(model.state_dict(), PATH) or as .safetensors",
        ) from exc
    except Exception as exc:
        first_line = " ".join(str(exc).split())[:160]
        raise WeightsError(
            f"{path} cannot be loaded as a state dict ({type(exc).__name__}: {first_line})",
            "save plain tensors with torch.save(model.state_dict(), PATH); pickled objects are refused for safety",
        ) from exc
    return Weights(_unwrap(state, path), "file", str(path.resolve()), file_sha256(path))


def _unwrap(state: Any, path: Path) -> dict[str, Any]:
    for key in ("state_dict", "model", "teacher", "student"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise WeightsError(f"{path} does not hold a state dict", "save model.state_dict()")
    cleaned = {}
    for key, value in state.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        cleaned[key] = value
    return cleaned


def build_resnet(weights: Weights, seed: int, arch: str = "resnet18"):
    """Build a torchvision ResNet with the given weights (seeded init when random)."""
    import torch
    import torchvision.models as tvm

    torch.manual_seed(seed)
    model = getattr(tvm, get_arch(arch).name)(weights=None)
    if weights.state is not None:
        state = {k: v for k, v in weights.state.items() if not k.startswith("fc.")}
        expected = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        misshapen = sorted(
            k for k in set(state) & set(expected) if tuple(getattr(state[k], "shape", ())) != tuple(expected[k].shape)
        )
        if missing or unexpected or misshapen:
            found = detect_arch(state)
            hint = (
                f"it looks like a {found}: pass --arch {found}"
                if found and found != arch
                else (f"give a torchvision or timm {arch} state dict")
            )
            raise WeightsError(
                f"{weights.source} does not fit {_pretty(arch)}: {len(missing)} missing keys (e.g. {missing[:2]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}), {len(misshapen)} of another shape "
                f"(e.g. {misshapen[:2]})",
                hint,
            )
        model.load_state_dict(state, strict=False)
    return model.eval()


def _pretty(arch: str) -> str:
    return arch.replace("resnet", "ResNet-")


def trunk_of(model, trainable: str = "last"):
    """Return the frozen part of a ResNet: conv1 ... layer4 without its last block (``trainable='last'``),
    or conv1 ... layer3 (``trainable='layer4'``); of a timm model, ``backbones.trunk_of``."""
    import torch

    if hasattr(model, "wsi_il_spec"):
        from wsi_il import backbones

        return backbones.trunk_of(model, trainable)

    kept = [] if check_trainable(trainable) == "layer4" else list(model.layer4)[:-1]
    trunk = torch.nn.Sequential(
        model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2, model.layer3, *kept
    )
    for param in trunk.parameters():
        param.requires_grad_(False)
    return trunk.eval()


def head_block_of(model, trainable: str = "last"):
    """Return the trainable part of a ResNet: the last block of layer4, or all of layer4 (a Sequential); of a
    timm model, ``backbones.init_tail``."""
    if hasattr(model, "wsi_il_spec"):
        from wsi_il import backbones

        return backbones.init_tail(model, trainable)
    if check_trainable(trainable) == "layer4":
        return model.layer4
    return model.layer4[-1]


def resize_tile(rgb: np.ndarray, input_px: int) -> np.ndarray:
    """Resize an RGB tile to the trunk's input size (antialiased bilinear).

    torch's uint8 kernel: 0.22 ms a 256 px tile where PIL's took 0.94 ms on one core of the development CPU, and
    the same result to one grey level on 0.2% of the values (every reader of every tile pays it).
    """
    if rgb.shape[0] == input_px and rgb.shape[1] == input_px:
        return rgb
    import torch

    pixels = torch.from_numpy(rgb if rgb.flags.writeable else rgb.copy()).permute(2, 0, 1).unsqueeze(0)
    return resize_batch(pixels, input_px)[0].permute(1, 2, 0).contiguous().numpy()


def resize_batch(batch, input_px: int, mode: str = "bilinear"):
    """Resize a uint8 batch (B, 3, H, W) to ``input_px`` a side (antialiased bilinear); uint8 out.

    On a CPU, torch's uint8 kernel: per tile the same values as before (``resize_tile`` is this), and batched it
    costs half as much a tile as one call per tile (0.19 against 0.37 ms on one core of the development CPU).
    Elsewhere (CUDA has no uint8 kernel) in float32, rounded back to whole grey levels: within one level of the
    CPU's values (its fixed-point weights round differently). ``mode``: 'bilinear', or 'bicubic' (a timm model's
    configuration may ask for it; computed in float32 everywhere).
    """
    import torch

    size = (input_px, input_px)
    if batch.device.type == "cpu" and mode == "bilinear":
        return torch.nn.functional.interpolate(batch, size=size, mode="bilinear", antialias=True)
    resized = torch.nn.functional.interpolate(batch.float(), size=size, mode=mode, antialias=True)
    return resized.round_().clamp_(0, 255).to(torch.uint8)


_LEVELS = np.arange(256, dtype=np.float64)


def channel_sums(rgb: np.ndarray) -> np.ndarray:
    """Return per-channel sum, sum of squares and pixel count of a uint8 tile scaled to [0, 1].

    From a histogram of each channel (exact): a float64 copy of the tile cost more than reading it, and one
    histogram of the three channels offset apart twice as much as three (0.42 against 0.19 ms a 224 px tile).
    """
    pixels = rgb.reshape(-1, 3)
    counts = np.stack([np.bincount(pixels[:, k], minlength=256) for k in range(3)]).astype(np.float64)
    return np.concatenate([counts @ _LEVELS / 255.0, counts @ _LEVELS**2 / 255.0**2, [len(pixels)]])


def mean_std(sums: np.ndarray) -> tuple[list[float], list[float]]:
    """Turn accumulated channel sums into per-channel mean and std."""
    count = max(sums[6], 1.0)
    mean = sums[:3] / count
    std = np.sqrt(np.maximum(sums[3:6] / count - mean**2, 1e-8))
    return mean.tolist(), std.tolist()


GPU_BATCH = 256
"""Fewest patches per trunk batch on a GPU: at the CPU's 32, an H100 ran the trunk at 5,486 patches/s on
in-memory batches, 5.8 ms a batch for about 0.1 ms of arithmetic (docs/speed.md, "GPU")."""


def trunk_batch_size(device: Any, configured: int) -> int:
    """Patches per trunk batch on a device: the project's setting on a CPU, at least ``GPU_BATCH`` on a GPU (there
    the per-batch cost of ~60 kernel launches and two copies sets the pace of small batches)."""
    return configured if str(device).startswith("cpu") else max(configured, GPU_BATCH)


def upload(array: np.ndarray, dev: Any, into: Any = None):
    """A host array on a GPU, asynchronously: copied by every core into pinned memory (from torch's cache, which
    keeps it until the copy to the device is done), then to the device by DMA; into the device tensor ``into``
    where given. ``array`` may be reused as soon as this returns. A copy from pageable memory is one thread's
    memcpy into the driver's buffers, on the caller's time."""
    import torch

    staging = torch.empty(array.shape, dtype=getattr(torch, array.dtype.name), pin_memory=True)
    parallel_copy(staging.numpy(), array)
    if into is not None:
        return into.copy_(staging, non_blocking=True)
    return staging.to(dev, non_blocking=True)


def parallel_copy(target: np.ndarray, source: np.ndarray) -> None:
    """``target[...] = source`` in slices of rows, one a core (numpy's copy leaves the interpreter lock free)."""
    bounds = np.linspace(0, len(source), min(len(source), default_workers()) + 1).astype(int)
    list(
        core_threads().map(
            lambda a, b: np.copyto(target[a:b], source[a:b], casting="same_kind"), bounds[:-1], bounds[1:]
        )
    )


def batch_ranges(start: int, stop: int, size: int) -> list[range]:
    """Split the indices start .. stop-1 into consecutive ranges of at most ``size``."""
    return [range(s, min(s + size, stop)) for s in range(start, stop, size)]


class FeatureExtractor:
    """Resize tiles on the device, normalise them and run them through the frozen trunk.

    Slides' tiles come to it at their own size (256 px by default): resizing them here, batched and on the
    device, takes the resize off the readers, whose speed bounds extraction on a GPU machine.
    """

    def __init__(
        self,
        model,
        mean: list[float],
        std: list[float],
        device: str,
        trainable: str = "last",
        input_px: int = 224,
        interpolation: str = "bilinear",
    ) -> None:
        import torch

        self.torch = torch
        self.input_px = input_px
        self.interpolation = interpolation
        self.device = torch.device(device)
        self.trunk = trunk_of(model, trainable).to(self.device).to(memory_format=torch.channels_last)
        self.normalise_with(mean, std)
        self.precision = precision_name(self.device)
        """'bf16' where the device computes it natively, else 'fp32' (recorded with each slide's features); set it
        to 'fp32' to compute in float32 where bf16 would be chosen (a comparison's baseline)."""
        self.threads = default_workers() if self.device.type == "cpu" else 0
        """Threads the trunk computes with on a CPU: every core (set in the thread that computes: OpenMP's count is
        a thread's own, and ``build_database`` builds the extractor in another)."""
        self.graph: TrunkGraph | None = None
        """On CUDA, after ``warm_up``: the whole computation of a batch of the slides' shape as one CUDA graph."""
        self.warmed: tuple[int, ...] | None = None
        """The batch shape of the last ``warm_up``."""

    def normalise_with(self, mean: list[float], std: list[float]) -> None:
        """Set the per-channel mean and std (of pixels scaled to [0, 1]) the tiles are normalised with: in place
        once set, since a captured graph reads them where they were."""
        torch = self.torch
        values = (
            torch.tensor(mean, device=self.device).view(1, 3, 1, 1) * 255.0,
            torch.tensor(std, device=self.device).view(1, 3, 1, 1) * 255.0,
        )
        if hasattr(self, "mean"):
            self.mean.copy_(values[0])
            self.std.copy_(values[1])
        else:
            self.mean, self.std = values

    def warm_up(self, batch: int, tile_px: int) -> None:
        """On a GPU, capture the computation of a batch of ``batch`` tiles of ``tile_px`` as a CUDA graph (running
        it first: the first use of each kernel, loading it and cuDNN's choice of algorithm, then happens here,
        ahead of the slides' first batch). Where capture fails, or ``$WSI_IL_CUDA_GRAPHS`` is 0, the batches run
        kernel by kernel, warmed up the same way. Nothing to do on a CPU, or for the shape of the last call."""
        shape = (batch, tile_px, tile_px, 3)
        if self.device.type != "cuda" or shape == self.warmed:
            return
        self.warmed, self.graph = shape, None  # one graph at a time (its memory is that of a batch's activations)
        if cuda_graphs_wanted(self.device):
            try:
                self.graph = TrunkGraph(self, shape)
                return
            except RuntimeError as exc:
                import warnings

                warnings.warn(
                    f"the trunk could not be captured as a CUDA graph ({str(exc).splitlines()[0][:160]}); "
                    f"its kernels are launched one by one, slower (set {GRAPHS_ENV}=0 to skip the "
                    "attempt)",
                    stacklevel=2,
                )
        self(np.zeros(shape, np.uint8))

    def batch_size(self, configured: int) -> int:
        """Patches per trunk batch on this device (``trunk_batch_size``)."""
        return trunk_batch_size(self.device, configured)

    def __call__(self, tiles: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
        """Return float16 features (B, C, 7, 7), or (B, C, 14, 14) after layer3 (a timm model's: ``store_shape``),
        of uint8 tiles (B, H, W, 3) of any one size (resized to ``input_px`` first where they are not at it); of the
        rows ``keep`` marks only, where given."""
        return self.submit(tiles, keep).result()

    def submit(self, tiles: np.ndarray, keep: np.ndarray | None = None) -> Features:
        """Start computing ``self(tiles, keep)``; ``tiles`` may be reused as soon as this returns.

        On a GPU the features come back while the caller gets the next batch ready: the copy to the host is
        asynchronous (into pinned memory) and ``result()`` waits for it. On a CPU they are computed here.
        """
        torch = self.torch
        if self.threads and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        picked = keep is not None and not keep.all()
        with torch.inference_mode():
            if self.graph is not None and tiles.shape == self.graph.shape:
                # every tile through the graph (the GPU has time to spare), the kept rows picked out after
                out = self.graph.run(tiles)
                if picked:
                    out = out[self._on_device(np.flatnonzero(keep))]
            else:
                batch = self._on_device(tiles)
                if picked:  # the tiles the pixel rule kept, picked out on the device
                    batch = batch[self._on_device(np.flatnonzero(keep))]
                out = self.compute(batch)
            if self.device.type != "cuda":
                return Features(out.cpu())
            host = torch.empty(out.shape, dtype=torch.float16, pin_memory=True)
            host.copy_(out, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            return Features(host, done)

    def compute(self, batch):
        """The float16 features of uint8 tiles (B, H, W, 3) already on the device."""
        torch = self.torch
        batch = batch.permute(0, 3, 1, 2)
        if batch.shape[-2:] != (self.input_px, self.input_px):
            batch = resize_batch(batch, self.input_px, self.interpolation)
        batch = ((batch.float() - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        with autocast(self.device, wanted=self.precision):
            out = self.trunk(batch)
        # float16 on the device: half the bytes to copy back, and no conversion on the host (1.9 s of a
        # 12,358-patch extraction on an H100 machine); the same values as numpy's conversion, bit for bit
        return out.to(torch.float16).contiguous()

    def _on_device(self, array: np.ndarray):
        """``array`` as a tensor on the extractor's device: on a GPU through pinned memory (``upload``; from pageable
        memory even a small copy would wait for the previous batch's trunk), on a CPU the same memory."""
        return upload(array, self.device) if self.device.type == "cuda" else self.torch.from_numpy(array)


class TrunkGraph:
    """``FeatureExtractor.compute`` of one batch shape captured as one CUDA graph, with its input and output.

    A batch is then one launch instead of about a hundred kernels launched one by one from Python: in the third
    H100 loan the convolutions' launches alone took 0.67 s of the main thread's time in a 12,358-patch extraction
    (about 13 ms a 256-tile batch), and the features stage ran at 0.42 of what the readers delivered, the GPU 85%
    idle. A replay runs the kernels that the eager path runs, so the features are the same.
    """

    WARMUP = 2
    """Eager runs on a side stream before capture, as CUDA graphs need (cuDNN's plans, the allocator's blocks)."""

    def __init__(self, extractor: FeatureExtractor, shape: tuple[int, ...]) -> None:
        torch = extractor.torch
        dev = extractor.device
        self.shape = shape
        self.tiles = torch.zeros(shape, dtype=torch.uint8, device=dev)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(self.WARMUP):
                extractor.compute(self.tiles)
        torch.cuda.current_stream(dev).wait_stream(side)
        torch.cuda.synchronize(dev)
        self.graph = torch.cuda.CUDAGraph()
        # capture_begin/end rather than the torch.cuda.graph context, which collects Python's garbage first (tens
        # of milliseconds); thread_local: the main thread may meanwhile use CUDA (pinned memory) for other work
        with torch.cuda.stream(side), torch.inference_mode():
            self.graph.capture_begin(capture_error_mode="thread_local")
            try:
                self.out = extractor.compute(self.tiles)
            finally:
                self.graph.capture_end()
        self.dev = dev

    def run(self, tiles: np.ndarray):
        """Copy ``tiles`` into the graph's input and replay it, on the current stream; returns its output (valid
        until the next run, which the stream's order keeps from overwriting it while it is read)."""
        upload(tiles, self.dev, into=self.tiles)
        self.graph.replay()
        return self.out


class Features:
    """Features on their way to the host: ``result()`` returns them (numpy float16) once they are there."""

    def __init__(self, values: Any, done: Any = None) -> None:
        self.values, self.done = values, done

    def result(self) -> np.ndarray:
        if self.done is not None:
            self.done.synchronize()
            self.done = None
        return self.values.numpy()


def load_project_weights(settings: FeatureSettings) -> Weights:
    """Load the weights that made the project's features, checking the file has not changed."""
    if settings.arch_args is not None:
        from wsi_il.backbones import choose_timm, weights_of

        weights = weights_of(choose_timm(settings.weights, settings.arch, {}))
    else:
        weights = resolve_weights(settings.weights, settings.arch)
    if settings.weights_sha256 and weights.sha256 and weights.sha256 != settings.weights_sha256:
        raise InputError(
            f"the weights {weights.source} have changed since the project's features were made "
            f"(sha256 {weights.sha256[:12]} != {settings.weights_sha256[:12]})",
            "restore the original weights file",
        )
    return weights
