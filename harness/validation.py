"""Argument checks shared by the public API and the command line.

Each check returns the value in its canonical type or raises :class:`InputError` naming
the argument and what was wrong, in the style of scikit-learn's ``check_scalar`` (which
does the type and range test here; we add what it lets through: ``True`` as an integer,
NaN and infinity as floats).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from sklearn.utils import check_scalar

from harness.errors import InputError

MAX_SEED = 2**32 - 1  # scikit-learn's random_state range; torch accepts it too


def _bounds(min_val: Any, max_val: Any, include_boundaries: str) -> str:
    left = include_boundaries in ("left", "both")
    right = include_boundaries in ("right", "both")
    if min_val is not None and max_val is not None:
        return f"in {'[' if left else '('}{min_val}, {max_val}{']' if right else ')'}"
    if min_val is not None:
        return f"{'>=' if left else '>'} {min_val}"
    return f"{'<=' if right else '<'} {max_val}"


def _scalar(value: Any, name: str, target_type, min_val=None, max_val=None, include_boundaries="both") -> Any:
    """scikit-learn's ``check_scalar``, with one message style: "NAME must be ...; got VALUE"."""
    try:
        return check_scalar(value, name, target_type, min_val=min_val, max_val=max_val,
                            include_boundaries=include_boundaries)
    except TypeError as exc:
        kind = "an integer" if target_type is numbers.Integral else "a number"
        raise InputError(f"{name} must be {kind}; got {type(value).__name__} {value!r}") from exc
    except ValueError as exc:
        raise InputError(f"{name} must be {_bounds(min_val, max_val, include_boundaries)}; got {value!r}") from exc


def check_int(value: Any, name: str, min_val: int | None = None, max_val: int | None = None) -> int:
    """An integer (Python or numpy; not a bool, not a float such as 1.0 or 1.7) in [min_val, max_val]."""
    if isinstance(value, (bool, np.bool_)):
        raise InputError(f"{name} must be an integer; got the boolean {value!r}")
    return int(_scalar(value, name, numbers.Integral, min_val=min_val, max_val=max_val))


def check_optional_int(value: Any, name: str, min_val: int | None = None) -> int | None:
    return None if value is None else check_int(value, name, min_val)


def check_float(
    value: Any,
    name: str,
    min_val: float | None = None,
    max_val: float | None = None,
    include_boundaries: str = "both",
) -> float:
    """A finite real number (int or float; not a bool, not a string) in the given range."""
    if isinstance(value, (bool, np.bool_)):
        raise InputError(f"{name} must be a number; got the boolean {value!r}")
    number = _scalar(value, name, numbers.Real)
    if not math.isfinite(float(number)):
        raise InputError(f"{name} must be finite; got {value!r}")
    return float(_scalar(number, name, numbers.Real, min_val=min_val, max_val=max_val,
                         include_boundaries=include_boundaries))


def check_seed(value: Any, name: str = "seed") -> int:
    """A seed: an integer in [0, 2**32 - 1]."""
    return check_int(value, name, 0, MAX_SEED)


def check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise InputError(f"{name} must be True or False; got {value!r}")
    return bool(value)


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise InputError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_device(value: Any, name: str = "device") -> torch.device:
    """A torch device that exists on this machine (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...)."""
    if not isinstance(value, (str, torch.device)):
        raise InputError(f"{name} must be a device name such as 'cpu' or 'cuda'; got {type(value).__name__}")
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError) as exc:
        raise InputError(f"{name} {value!r} is not a torch device (e.g. cpu, cuda, cuda:0)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"{name} {value!r}: no CUDA GPU is available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"{name} {value!r}: only {torch.cuda.device_count()} CUDA device(s) exist")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"{name} {value!r}: MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"{name} {value!r}: only cpu, cuda and mps devices are supported")
    return device


def check_layers(value: Any) -> list[str] | None:
    """``None``, a name, or a non-empty sequence of names (module or parameter names)."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if not isinstance(value, Iterable) or isinstance(value, (bytes, dict)):
        raise InputError(f"layers must be a name or a sequence of names; got {type(value).__name__}")
    names = list(value)
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise InputError(f"layers must hold module or parameter names (strings); got {bad[0]!r}")
    return names


def check_numeric_array(value: Any, name: str) -> np.ndarray:
    """A real (integer or floating, not bool/string/object) array."""
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} is not an array of numbers: {exc}") from exc
    if array.dtype == bool or not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise InputError(f"{name} must hold real numbers; got dtype {array.dtype}")
    return array


def check_indices(value: Any, name: str, n: int) -> np.ndarray:
    """A 1-D array of example indices in [0, n): integers (an integral float such as 3.0 is
    accepted as 3; 2.5 or True is not)."""
    if isinstance(value, (str, bytes)):
        raise InputError(f"{name} must be a list of example indices; got the string {value[:40]!r}")
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} must be a flat list of example indices: {exc}") from exc
    if array.ndim != 1:
        raise InputError(f"{name} must be a flat list of example indices; got shape {array.shape}")
    if array.size == 0:
        return array.astype(np.int64)
    if array.dtype == bool or not np.issubdtype(array.dtype, np.number):
        raise InputError(f"{name} must hold integer example indices; got dtype {array.dtype}")
    if not np.issubdtype(array.dtype, np.integer):
        if not np.isfinite(array).all() or (array != np.round(array)).any():
            raise InputError(f"{name} must hold integer example indices; got {array[array != np.round(array)][:3]}")
    indices = array.astype(np.int64)
    if indices.min() < 0 or indices.max() >= n:
        raise InputError(f"{name} out of range: indices must lie in [0, {n}); got [{indices.min()}, {indices.max()}]")
    if np.unique(indices).size != indices.size:
        raise InputError(f"{name} list an example more than once")
    return indices


def check_loader(loader: Any, what: str, passes: str = "once") -> None:
    """A loader must be an iterable of batches; one iterated more than ``once`` (fit's P + 1
    passes) must be re-iterable: a generator or iterator would be empty after one pass."""
    if isinstance(loader, (str, bytes, dict)) or not isinstance(loader, Iterable):
        raise InputError(f"the {what} loader must be an iterable of batches (a DataLoader or a list); "
                         f"got {type(loader).__name__}")
    if passes != "once" and iter(loader) is loader:
        raise InputError(f"the {what} loader is a one-shot iterator ({type(loader).__name__}), but it is passed over "
                         f"{passes}: give a DataLoader or a list of batches")


def check_loader_order(loader: Any, what: str) -> None:
    """Refuses a loader that visits examples in random order (``shuffle=True`` or a random
    sampler): embeddings come back in loader order and would no longer match the dataset."""
    check_loader(loader, what)
    sampler = getattr(loader, "sampler", None)
    if sampler is None:
        return
    if isinstance(sampler, torch.utils.data.RandomSampler) or getattr(sampler, "shuffle", False):
        raise InputError(
            f"the {what} loader shuffles (shuffle=True or a random sampler): embeddings are returned in loader "
            "order and would not match the dataset's order. Use DataLoader(..., shuffle=False)."
        )
    if isinstance(sampler, (torch.utils.data.WeightedRandomSampler, torch.utils.data.SubsetRandomSampler)):
        raise InputError(f"the {what} loader samples at random ({type(sampler).__name__}); use a sequential sampler")


def _tensor(state: dict, key: str, where: str, ndim: int) -> torch.Tensor:
    value = state[key]
    if not torch.is_tensor(value):
        raise InputError(f"{where}: {key!r} must be a tensor; got {type(value).__name__}")
    if value.dim() != ndim or not value.dtype.is_floating_point:
        raise InputError(f"{where}: {key!r} must be a {ndim}-D floating tensor; got {value.dtype} {tuple(value.shape)}")
    if not torch.isfinite(value).all():
        raise InputError(f"{where}: {key!r} holds non-finite values")
    return value


def check_factors_state(state: Any, where: str, file_format: str, config_fields: Sequence[str]) -> dict:
    """The fields of a saved factors file, every one checked: keys, types, shapes, dtypes,
    finite values and positive eigenvalues. Returns the state with residuals as numpy."""
    if not isinstance(state, dict) or state.get("format") != file_format:
        raise InputError(f"{where} is not an InfluenceEmbedder factors file ({file_format})")
    required = ("config", "layers", "parameter_names", "parameter_shapes", "factors", "eigenvalues",
                "ritz_residuals", "arnoldi_spectrum", "arnoldi_iterations", "arnoldi_breakdown", "n_fit_examples")
    missing = [k for k in required if k not in state]
    if missing:
        raise InputError(f"{where}: factors file lacks field(s) {missing}")
    config = state["config"]
    if not isinstance(config, dict):
        raise InputError(f"{where}: 'config' must be a dict; got {type(config).__name__}")
    unknown = sorted(set(config) - set(config_fields), key=str)
    if unknown:
        raise InputError(f"{where}: unknown config key(s) {unknown}; known: {list(config_fields)}")
    if state["layers"] is not None and not (
        isinstance(state["layers"], list) and all(isinstance(n, str) for n in state["layers"])
    ):
        raise InputError(f"{where}: 'layers' must be None or a list of names")
    names, shapes = state["parameter_names"], state["parameter_shapes"]
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise InputError(f"{where}: 'parameter_names' must be a list of names")
    if not (isinstance(shapes, list) and len(shapes) == len(names) and all(
        isinstance(s, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in s)
        for s in shapes
    )):
        raise InputError(f"{where}: 'parameter_shapes' must be one list of sizes per parameter name")
    factors = _tensor(state, "factors", where, 2)
    eigenvalues = _tensor(state, "eigenvalues", where, 1)
    residuals = _tensor(state, "ritz_residuals", where, 1)
    spectrum = _tensor(state, "arnoldi_spectrum", where, 1)
    n_params = sum(math.prod(s) for s in shapes)
    n_components = eigenvalues.shape[0]
    if n_components == 0 or factors.shape != (n_params, n_components):
        raise InputError(
            f"{where}: factors have shape {tuple(factors.shape)}; expected ({n_params}, {n_components}) for "
            f"{n_params} parameters and {n_components} eigenvalues"
        )
    if not (eigenvalues > 0).all():
        raise InputError(f"{where}: eigenvalues must be positive (they are inverted); got min {eigenvalues.min():.3g}")
    if residuals.shape[0] != n_components or (residuals < 0).any():
        raise InputError(f"{where}: 'ritz_residuals' must be {n_components} non-negative values")
    iterations = state["arnoldi_iterations"]
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < n_components:
        raise InputError(f"{where}: 'arnoldi_iterations' must be an integer >= {n_components}; got {iterations!r}")
    if spectrum.shape[0] < n_components:
        raise InputError(f"{where}: 'arnoldi_spectrum' must hold at least {n_components} values")
    if not isinstance(state["arnoldi_breakdown"], bool):
        raise InputError(f"{where}: 'arnoldi_breakdown' must be True or False")
    n_fit = state["n_fit_examples"]
    if not isinstance(n_fit, int) or isinstance(n_fit, bool) or n_fit < 1:
        raise InputError(f"{where}: 'n_fit_examples' must be a positive integer; got {n_fit!r}")
    return {**state, "eigenvalues": eigenvalues.to(torch.float64),
            "ritz_residuals": residuals.numpy(), "arnoldi_spectrum": spectrum.double().numpy()}
