"""The one cache: named, persisted stages whose keys are derived, never typed.

A stage (trained weights, trunk features, Hessian factors, embeddings) is stored under
``<INFEMBED_CACHE>/<namespace>/<stage>/<key>.pt``. Its key is a hash of

- the keys of its inputs (the :class:`Keyed` results of earlier stages, or content
  hashes of data made with :func:`content_key` / :func:`weights_key`),
- its own configuration (a dataclass or a JSON-able dict),
- the code it depends on (a stage's ``version`` string; bump it when the computation
  changes) and the environment whose kernels shape its numbers (torch version, CPU
  capability),

and is returned with the result (:class:`Keyed`), so the next stage is keyed from it and
no caller retypes a field. The arguments are written as JSON beside the result
(``<key>.json``), so a cached file says what made it. Results are written atomically:
an interrupted stage leaves nothing behind and is recomputed on the next run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any, Callable, Generic, Mapping, TypeVar

import numpy as np
import torch
from torch import nn

from harness.io import atomic_torch_save, atomic_write_text, load_torch_file
from harness.paths import cache_dir

T = TypeVar("T")


@dataclass(frozen=True)
class Keyed(Generic[T]):
    """A stage's result and the key it is cached under (the input key of later stages)."""

    value: T
    key: str


def config_key(config: Any) -> str:
    """A short stable hash of a JSON-able configuration (a dict or a dataclass)."""
    if is_dataclass(config) and not isinstance(config, type):
        config = asdict(config)
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def content_key(*parts: Any) -> str:
    """A hash of data: tensors and arrays by dtype, shape and bytes, everything else by its
    JSON form (lists of file names, index arrays, strings)."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            part = part.detach().cpu().contiguous().numpy()
        if isinstance(part, np.ndarray):
            digest.update(f"{part.dtype}{part.shape}".encode())
            digest.update(np.ascontiguousarray(part).tobytes())
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _add_state(digest: Any, state: Mapping[str, torch.Tensor]) -> Any:
    for name, tensor in state.items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest


def state_dict_key(state: Mapping[str, torch.Tensor]) -> str:
    """A hash of every tensor of a state dict, by name and bytes (architecture not included)."""
    return _add_state(hashlib.sha256(), state).hexdigest()[:16]


def weights_key(module: nn.Module) -> str:
    """A hash of a module's architecture and every tensor of its state: stages computed
    from a model follow its weights."""
    return _add_state(hashlib.sha256(repr(module).encode()), module.state_dict()).hexdigest()[:16]


def environment() -> dict[str, str]:
    """What shapes the last digits of every stage besides its inputs: torch picks its
    kernels by version and CPU capability, and trained weights differ with them."""
    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability()}


def stage_key(stage: str, inputs: Mapping[str, Keyed | str] | None = None, config: Any = None,
              version: str = "1") -> str:
    """The key of ``stage`` run on ``inputs`` (their keys) with ``config``."""
    return config_key(_arguments(stage, inputs, config, version))


def _arguments(stage: str, inputs: Mapping[str, Keyed | str] | None, config: Any, version: str) -> dict[str, Any]:
    if is_dataclass(config) and not isinstance(config, type):
        config = asdict(config)
    return {"stage": stage, "version": version, "environment": environment(),
            "inputs": {name: item.key if isinstance(item, Keyed) else str(item) for name, item in (inputs or {}).items()},
            "config": config}


def _save_torch(value: Any, path: Path) -> None:
    atomic_torch_save(value, path)


def _load_torch(path: Path) -> Any:
    return load_torch_file(path, "cached stage result")


class Cache:
    """The persisted stages of one namespace (an experiment, ``cli``, ``bench``, ...)."""

    def __init__(self, namespace: str):
        self.namespace = namespace

    def path(self, stage: str, key: str) -> Path:
        return cache_dir(self.namespace, stage) / f"{key}.pt"

    def stage(self, stage: str, compute: Callable[[], T], *, inputs: Mapping[str, Keyed | str] | None = None,
              config: Any = None, version: str = "1", save: Callable[[T, Path], Any] = _save_torch,
              load: Callable[[Path], T] = _load_torch) -> Keyed[T]:
        """``compute()``'s result, or the one stored earlier under the same derived key.

        ``save(value, path)`` must write ``path`` atomically; ``load(path)`` reads it back
        (both default to tensors and plain containers, read with ``weights_only=True``).
        """
        arguments = _arguments(stage, inputs, config, version)
        key = config_key(arguments)
        path = self.path(stage, key)
        if path.is_file():
            return Keyed(load(path), key)
        value = compute()
        save(value, path)
        atomic_write_text(json.dumps(arguments, indent=1, sort_keys=True, default=str) + "\n", path.with_suffix(".json"))
        return Keyed(value, key)

    def trained(self, model: nn.Module, train: Callable[[nn.Module], nn.Module], *,
                inputs: Mapping[str, Keyed | str] | None = None, config: Any = None,
                stage: str = "models") -> Keyed[nn.Module]:
        """``model`` with trained weights: ``train(model)``'s, or those stored under the key
        of (its initial weights and architecture, ``inputs``, ``config``). The key returned is
        the trained weights' own (:func:`weights_key`), so later stages follow the weights."""
        state = self.stage(
            stage, lambda: {k: v.detach().cpu() for k, v in train(model).state_dict().items()},
            inputs={"initial_weights": weights_key(model), **(inputs or {})}, config=config,
        )
        model.load_state_dict(state.value)
        return Keyed(model.eval(), weights_key(model))


def cached_training(model: nn.Module, train: Callable[[nn.Module], nn.Module], cache: Cache | str,
                    inputs: Mapping[str, Keyed | str] | None = None, config: Any = None,
                    stage: str = "models") -> nn.Module:
    """:meth:`Cache.trained` for callers that need only the model."""
    cache = Cache(cache) if isinstance(cache, str) else cache
    return cache.trained(model, train, inputs=inputs, config=config, stage=stage).value

