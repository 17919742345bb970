"""Makes the 2021-22 reference stack import on today's libraries.

``domino==0.1.5``, ``dcbench==0.0.4`` and ``meerkat-ml==0.2.5`` were written against
numpy 1.x, pandas 1.x, scikit-learn 0.24, torchvision < 0.13 and Python <= 3.10. The
harness never needs them: they serve only (a) the tests that compare our Domino and our
metrics with the reference code and (b) the real-dcbench path, which loads problems
through the ``dcbench`` package. Install them without their (stale) pins::

    pip install "pip<24.1"   # newer pip rejects meerkat-ml 0.2.5's malformed metadata
    pip install --no-deps domino==0.1.5 dcbench==0.0.4 meerkat-ml==0.2.5
    pip install dill==0.4.1 cytoolz==1.2.0 ujson==6.1.0 pyarrow==26.0.1 fvcore==0.1.5.post20221221 \
        ipython==9.18.1 ipywidgets==8.1.9 seaborn==0.13.2 pytorch-lightning==2.6.6

(the last line: what the three import at module level, at the versions tested), then call
:func:`import_domino` / :func:`import_dcbench` instead of ``import``. The patches:

- numpy 2: ``np.infty``; pandas 2: ``pandas.core.strings.StringMethods``,
  ``DataFrame.iteritems`` (aliases of today's names);
- torchvision >= 0.13: ``resnet.model_urls`` / ``densenet.model_urls`` (from the Weights enums);
- scikit-learn >= 1.0: ``sklearn.mixture._base._check_X``, and on domino's mixture class
  only: ``_check_n_features``, ``_check_initial_parameters``, the one-argument
  ``_print_verbose_msg_init_end``;
- Python 3.11: dcbench's ``Table`` (a dataclass field default) made hashable by identity;
- the dcbench 0.0.4 wheel lacks ``dcbench.tasks.budgetclean.cpclean``: stand-ins that raise.

None changes what today's libraries do for other callers; the restored aliases simply
exist afterwards.

dcbench and meerkat read their files with pickle (``torch.load``, ``dill``, yaml's
FullLoader): a downloaded problem could run code. :func:`load_dcbench_yaml`,
:func:`load_dcbench_model_file` and :func:`load_dcbench_panel` read the same files
without unpickling anything; a file that truly needs pickle is refused unless
``INFEMBED_TRUST_PICKLE=1`` says its source is trusted.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

INSTALL_HINT = (
    'pip install "pip<24.1" && pip install --no-deps domino==0.1.5 dcbench==0.0.4 meerkat-ml==0.2.5 '
    "&& pip install dill==0.4.1 cytoolz==1.2.0 ujson==6.1.0 pyarrow==26.0.1 fvcore==0.1.5.post20221221 "
    "ipython==9.18.1 ipywidgets==8.1.9 seaborn==0.13.2 pytorch-lightning==2.6.6 (see harness/compat.py)"
)

_CPCLEAN = "dcbench.tasks.budgetclean.cpclean"


class LegacyStackUnavailable(ImportError):
    """The reference packages (domino / dcbench / meerkat-ml) are not installed or do not import."""


def _patch_numpy_pandas() -> None:
    import numpy as np
    import pandas as pd
    import pandas.core.strings as pandas_strings
    from pandas.core.strings.accessor import StringMethods

    # numpy 2 removed the alias; meerkat and domino use it as -inf start values.
    if not hasattr(np, "infty"):
        np.infty = np.inf
    # pandas 2 moved StringMethods into pandas.core.strings.accessor (meerkat imports the old path).
    if not hasattr(pandas_strings, "StringMethods"):
        pandas_strings.StringMethods = StringMethods
    # pandas 2 removed DataFrame.iteritems (meerkat's DataPanel.from_pandas calls it).
    if not hasattr(pd.DataFrame, "iteritems"):
        pd.DataFrame.iteritems = pd.DataFrame.items


def _patch_torchvision() -> None:
    import torchvision.models as models
    import torchvision.models.densenet as densenet
    import torchvision.models.resnet as resnet

    # torchvision 0.13 replaced the module-level ``model_urls`` dicts by Weights enums;
    # dcbench.common.modeling imports them to build its pretrained backbones.
    if not hasattr(resnet, "model_urls"):
        resnet.model_urls = {
            "resnet18": models.ResNet18_Weights.IMAGENET1K_V1.url,
            "resnet50": models.ResNet50_Weights.IMAGENET1K_V1.url,
        }
    if not hasattr(densenet, "model_urls"):
        densenet.model_urls = {"densenet121": models.DenseNet121_Weights.IMAGENET1K_V1.url}


def _check_X(X, n_components=None, n_features=None, ensure_min_samples=1):  # noqa: N802, N803 - old sklearn name
    """scikit-learn 0.24's ``sklearn.mixture._base._check_X`` (removed in 1.0), which domino imports."""
    import numpy as np
    from sklearn.utils import check_array

    X = check_array(X, dtype=[np.float64, np.float32], ensure_min_samples=ensure_min_samples)
    if n_components is not None and X.shape[0] < n_components:
        raise ValueError(f"Expected n_samples >= n_components but got n_components = {n_components}, "
                         f"n_samples = {X.shape[0]}")
    if n_features is not None and X.shape[1] != n_features:
        raise ValueError(f"Expected the input data X have {n_features} features, but got {X.shape[1]} features")
    return X


def _patch_sklearn() -> None:
    import sklearn.mixture._base as mixture_base

    if not hasattr(mixture_base, "_check_X"):
        mixture_base._check_X = _check_X


def _patch_domino_mixture(domino_module: types.ModuleType) -> None:
    """Restores three BaseMixture methods of scikit-learn 0.24 on domino's mixture only."""
    from sklearn.utils.validation import _check_n_features

    mixture = domino_module._slice.domino.DominoMixture
    if not hasattr(mixture, "_check_n_features"):
        mixture._check_n_features = lambda self, X, reset: _check_n_features(self, X, reset=reset)
    if not hasattr(mixture, "_check_initial_parameters"):
        mixture._check_initial_parameters = lambda self, X: self._check_parameters(X)
    base_end = mixture._print_verbose_msg_init_end
    if base_end.__code__.co_argcount == 3:  # today's (self, lb, init_has_converged); domino passes lb only
        mixture._print_verbose_msg_init_end = lambda self, lb, init_has_converged=None: base_end(
            self, lb, bool(getattr(self, "converged_", False)) if init_has_converged is None else init_has_converged
        )


def _preload_dcbench_table() -> None:
    """dcbench's ``Task`` dataclass has a ``Table`` instance as a field default. Python
    3.11 rejects unhashable defaults (``Table`` is a Mapping, hence unhashable), so the
    table module is loaded first and ``Table`` made hashable by identity, as every object
    was for dataclasses before 3.11."""
    name = "dcbench.common.table"
    if name in sys.modules:
        return
    spec = importlib.util.find_spec("dcbench")
    if spec is None or spec.origin is None:
        raise LegacyStackUnavailable(f"dcbench is not installed: {INSTALL_HINT}")
    table_spec = importlib.util.spec_from_file_location(name, Path(spec.origin).parent / "common" / "table.py")
    module = importlib.util.module_from_spec(table_spec)
    sys.modules[name] = module
    try:
        table_spec.loader.exec_module(module)
    except Exception:
        del sys.modules[name]
        raise
    module.Table.__hash__ = object.__hash__


def _absent_cpclean(*args, **kwargs):
    raise NotImplementedError(
        "dcbench 0.0.4's wheel does not ship dcbench.tasks.budgetclean.cpclean; the budgetclean "
        "task's cp_clean baseline is unavailable (slice discovery does not use it)"
    )


def _stub_cpclean() -> None:
    """The dcbench 0.0.4 wheel lacks the ``cpclean`` subpackage that ``dcbench/__init__``
    imports (through the budgetclean task). Its four names are registered as functions
    that raise when called; slice discovery never calls them."""
    names = {
        _CPCLEAN: [],
        f"{_CPCLEAN}.algorithm": [],
        f"{_CPCLEAN}.algorithm.select": ["entropy_expected"],
        f"{_CPCLEAN}.algorithm.sort_count": ["sort_count_after_clean_multi"],
        f"{_CPCLEAN}.clean": ["CPClean", "Querier"],
    }
    if importlib.util.find_spec("dcbench") is None:
        return
    budgetclean = Path(importlib.util.find_spec("dcbench").origin).parent / "tasks" / "budgetclean"
    if (budgetclean / "cpclean").is_dir():
        return
    for name, attributes in names.items():
        if name in sys.modules:
            continue
        module = types.ModuleType(name, "stand-in: absent from the dcbench 0.0.4 wheel")
        module.__path__ = []
        for attribute in attributes:
            setattr(module, attribute, _absent_cpclean)
        sys.modules[name] = module


def _import(name: str) -> types.ModuleType:
    _patch_numpy_pandas()
    _patch_torchvision()
    _patch_sklearn()
    if name == "dcbench":
        _preload_dcbench_table()
        _stub_cpclean()
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise LegacyStackUnavailable(f"{name} does not import ({exc}); install the reference stack: {INSTALL_HINT}") from exc


def import_domino() -> types.ModuleType:
    """The reference ``domino`` package (0.1.5), patched to run on today's libraries.

    Raises :class:`LegacyStackUnavailable` (an ``ImportError``) when it is not installed.
    """
    domino = _import("domino")
    _patch_domino_mixture(domino)
    return domino


def import_dcbench() -> types.ModuleType:
    """The ``dcbench`` package (0.0.4) with meerkat-ml 0.2.5, patched to import on today's libraries.

    Raises :class:`LegacyStackUnavailable` (an ``ImportError``) when it is not installed.
    """
    return _import("dcbench")


def legacy_stack_available(name: str) -> bool:
    """Whether :func:`import_domino` (``name="domino"``) or :func:`import_dcbench` (``"dcbench"``) works."""
    try:
        {"domino": import_domino, "dcbench": import_dcbench}[name]()
    except LegacyStackUnavailable:
        return False
    return True


# ---------------------------------------------------------------- dcbench's files, without pickle
# dcbench reads problems.yaml with yaml's FullLoader and model artifacts with plain torch.load
# (pickle): a downloaded file could run code. These two loaders build only what the files
# legitimately hold; where an old artifact truly needs pickle, TRUST_PICKLE_ENV=1 opts in.
TRUST_PICKLE_ENV = "INFEMBED_TRUST_PICKLE"


def _dcbench_class(suffix: str, allowed: tuple[type, ...]) -> type | None:
    """The class named ``module.Name`` if it is one of dcbench's ``allowed`` kinds, else None.
    Only dcbench's own (installed) modules are imported to find it."""
    module_name, _, attribute = suffix.rpartition(".")
    module = sys.modules.get(module_name)
    if module is None and module_name.split(".")[0] == "dcbench":
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            return None
    found = getattr(module, attribute, None) if module is not None else None
    return found if isinstance(found, type) and issubclass(found, allowed) else None


def load_dcbench_yaml(stream) -> object:
    """dcbench's ``problems.yaml`` through ``yaml.SafeLoader``, extended by dcbench's two tags
    (``!ArtifactContainer``, ``!Artifact``) and by ``!!python/name:`` restricted to dcbench's
    artifact and container classes: no other Python object can be named or built."""
    import yaml

    from harness.errors import InputError

    import_dcbench()
    from dcbench.common.artifact import Artifact, ArtifactContainer

    class DcbenchSafeLoader(yaml.SafeLoader):
        pass

    def python_name(loader, suffix: str, node):
        found = _dcbench_class(suffix, (Artifact, ArtifactContainer))
        if found is None:
            raise yaml.constructor.ConstructorError(
                None, None, f"refusing to build the Python object {suffix!r} (not a dcbench artifact class)",
                node.start_mark,
            )
        return found

    DcbenchSafeLoader.add_multi_constructor("tag:yaml.org,2002:python/name:", python_name)
    DcbenchSafeLoader.add_constructor("!ArtifactContainer", ArtifactContainer.from_yaml)
    DcbenchSafeLoader.add_constructor("!Artifact", Artifact.from_yaml)
    try:
        return yaml.load(stream, Loader=DcbenchSafeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise InputError(f"{getattr(stream, 'name', 'dcbench YAML')} is not a dcbench problems file: {exc}") from exc


def _subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


def load_dcbench_model_file(path) -> dict:
    """A dcbench model artifact (``{"class", "config", "state_dict"}``) with
    ``torch.load(weights_only=True)``: the ``class`` entry may only name a subclass of
    dcbench's ``Model`` already defined in this process (so the file runs no code of its
    own). A file needing anything else is refused unless ``INFEMBED_TRUST_PICKLE=1``."""
    import os
    import pickle

    import torch

    from harness.errors import InputError

    dcbench = import_dcbench()
    model_class = dcbench.common.modeling.Model
    try:
        with torch.serialization.safe_globals([model_class, *_subclasses(model_class)]):
            saved = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if os.environ.get(TRUST_PICKLE_ENV) != "1":
            raise InputError(
                f"{path} holds pickled Python objects other than a dcbench model class and tensors; unpickling them "
                f"can run arbitrary code. Only if you trust where the file came from, set {TRUST_PICKLE_ENV}=1 "
                "to load it with pickle"
            ) from exc
        saved = torch.load(path, map_location="cpu", weights_only=False)  # explicitly trusted by the user
    if not isinstance(saved, dict) or not {"class", "config", "state_dict"} <= saved.keys():
        raise InputError(f"{path} is not a dcbench model artifact (a dict with class, config and state_dict)")
    if not (isinstance(saved["class"], type) and issubclass(saved["class"], model_class)):
        raise InputError(f"{path}: 'class' is {saved['class']!r}, not a dcbench Model class")
    return saved


_PANEL_COLUMNS = {"meerkat.columns.numpy_column.NumpyArrayColumn", "meerkat.columns.tensor_column.TensorColumn"}
_PANEL_BLOCKS = {"meerkat.block.numpy_block.NumpyBlock": "data.npy", "meerkat.block.tensor_block.TensorBlock": "data.pt"}


def _read_panel_yaml(path: Path) -> dict:
    """A meerkat ``meta.yaml`` with ``!!python/name:X`` read as the string ``X``: nothing imported or built."""
    import yaml

    class NamesAsText(yaml.SafeLoader):
        pass

    NamesAsText.add_multi_constructor("tag:yaml.org,2002:python/name:", lambda loader, suffix, node: suffix)
    with open(path) as handle:
        meta = yaml.load(handle, Loader=NamesAsText)  # noqa: S506 - a SafeLoader subclass
    if not isinstance(meta, dict):
        raise ValueError(f"{path} is not a mapping")
    return meta


def _read_panel_columns(folder: Path) -> dict:
    """The columns of a meerkat 0.2.5 DataPanel folder (``*.mk``) as arrays, read without
    pickle: numpy blocks with ``allow_pickle=False``, tensor blocks with ``weights_only=True``."""
    import numpy as np
    import torch

    meta = _read_panel_yaml(folder / "mgr" / "meta.yaml")
    blocks: dict[str, object] = {}
    columns = {}
    for name in meta.get("_column_order") or list(meta["columns"]):
        column = meta["columns"][name]
        if column.get("dtype") not in _PANEL_COLUMNS or "block" not in column:
            raise TypeError(f"column {name!r} is stored as {column.get('dtype')}, which is read only with pickle")
        block_dir = folder / "mgr" / column["block"]["block_dir"]
        if block_dir.resolve().parent != (folder / "mgr" / "blocks").resolve():
            raise ValueError(f"column {name!r} points outside the panel: {column['block']['block_dir']}")
        if block_dir not in blocks:
            kind = _read_panel_yaml(block_dir / "meta.yaml").get("klass")
            if kind not in _PANEL_BLOCKS:
                raise TypeError(f"block {block_dir.name} is a {kind}, which is read only with pickle")
            data_path = block_dir / _PANEL_BLOCKS[kind]
            blocks[block_dir] = (np.load(data_path, allow_pickle=False) if data_path.suffix == ".npy"
                                 else torch.load(data_path, map_location="cpu", weights_only=True))
        index = column["block"]["block_index"]
        if isinstance(index, dict):
            index = slice(index["start"], index["stop"], index["step"])
        elif not isinstance(index, int) or isinstance(index, bool):
            raise ValueError(f"column {name!r} has block index {index!r}")
        columns[name] = blocks[block_dir][:, index]
    return columns


def load_dcbench_panel(artifact) -> object:
    """A dcbench DataPanel artifact (``val_predictions``, ``activations``, ...) as a meerkat
    ``DataPanel`` rebuilt from its arrays. meerkat's own ``DataPanel.read`` unpickles the
    folder's ``state.dill`` files and numpy blocks; this reader never does. A panel that
    holds other column types is refused unless ``INFEMBED_TRUST_PICKLE=1``."""
    import os

    from harness.errors import InputError

    import_dcbench()
    import meerkat as mk

    folder = Path(artifact.local_path)
    try:
        return mk.DataPanel(_read_panel_columns(folder))
    except (OSError, ValueError, TypeError, KeyError, RuntimeError, ImportError) as exc:
        if os.environ.get(TRUST_PICKLE_ENV) != "1":
            raise InputError(
                f"{folder} cannot be read without unpickling ({exc}); unpickling can run arbitrary code. Only if you "
                f"trust where the file came from, set {TRUST_PICKLE_ENV}=1 to read it with meerkat's own loader"
            ) from exc
        return artifact.load()  # explicitly trusted by the user
