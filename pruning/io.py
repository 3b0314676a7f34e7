"""Saving and loading pruned models.

A pruned model saves as a normal Hugging Face folder: ``model.save_pretrained(out)`` works
because :func:`pruning.apply_plan` keeps ``model.config`` right. When every block was pruned
alike, plain ``AutoModelForCausalLM.from_pretrained(out)`` loads it. The config also carries
``depgraph`` (the original config and the plans applied), from which :func:`load_pruned`
rebuilds any pruned model, including ones whose blocks differ. For those, :func:`save_pruned`
also writes a small ``modeling_depgraph.py`` and an ``auto_map`` entry, so that
``AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)`` loads it too (through
:func:`load_pruned`; depgraph must be installed where it is loaded).
"""

from __future__ import annotations

import copy
import json
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from depgraph.paths import atomic_folder

from .apply import RECORD_KEY, REPLAYS_PLANS, apply_plan, weight_holders
from .compensation import output_dim
from .saved_form import load_names

__all__ = ["load_pruned", "save_pruned", "read_pruning_info", "write_pruning_files"]


def save_pruned(model: nn.Module, out: str | Path, tokenizer=None, overwrite: bool = False,
                extra: dict | None = None, writer=None) -> Path:
    """``save_pretrained`` into a temporary folder, then rename it to ``out``.

    Also writes ``pruning.json`` (the plans and ``extra``: criterion, ratio, calibration ...).
    ``writer(folder)``, if given, adds more files to the temporary folder before the rename.
    Refuses to replace an existing ``out`` unless ``overwrite``.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output folder {str(out)!r} exists; pass overwrite=True to replace it")
    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_pruning_files(tmp, model, extra)
        if writer is not None:
            writer(tmp)
    return out


def write_pruning_files(folder: Path, model: nn.Module, extra: dict | None = None) -> None:
    """``pruning.json`` (the plans in ``model.config`` and ``extra``) and, for non-uniform
    plans, the remote code that loads them; only the config is read, so ``model`` may live
    on the meta device (the streamed pipeline writes its weights itself)."""
    record = getattr(getattr(model, "config", None), RECORD_KEY, None) or {}
    info = {"plans": record.get("plans", []), "config_exact": record.get("config_exact"),
            **(extra or {})}
    (folder / "pruning.json").write_text(json.dumps(info, indent=1, default=str))
    if record and not record.get("config_exact", True):
        _write_remote_code(folder, model)


REMOTE_MODULE = "modeling_depgraph"

_REMOTE_CODE = '''"""Loads this folder, pruned by depgraph with blocks of different widths.

``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` lands here; the
shapes of each block are rebuilt from the plans recorded in config.json by depgraph's
``pruning.load_pruned``, so depgraph must be installed.
"""

from transformers import {base} as _Base


class {name}(_Base):
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        try:
            from pruning.io import load_pruned
        except ImportError:
            raise ImportError("this model was pruned by depgraph with blocks of different "
                              "widths; install depgraph to load it") from None
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        device = kwargs.get("device_map")
        return load_pruned(pretrained_model_name_or_path,
                           dtype=None if dtype in (None, "auto") else dtype,
                           device=device if isinstance(device, str) and device != "auto" else "cpu")
'''


def _write_remote_code(folder: Path, model: nn.Module) -> None:
    """``modeling_depgraph.py`` and the ``auto_map`` that points at it (see the module doc)."""
    import transformers

    base = _model_class(model.config)  # the class depends only on the config's type
    if getattr(transformers, base.__name__, None) is not base:
        return  # not a class transformers exports by name: load_pruned still works
    name = f"Depgraph{base.__name__}"
    (folder / f"{REMOTE_MODULE}.py").write_text(_REMOTE_CODE.format(base=base.__name__, name=name))
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config["auto_map"] = {**config.get("auto_map", {}),
                          "AutoModelForCausalLM": f"{REMOTE_MODULE}.{name}"}
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_pruning_info(path: str | Path) -> dict:
    """The ``pruning.json`` a pruned folder carries (``{}`` when there is none)."""
    file = Path(path) / "pruning.json"
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(file)!r} is not valid JSON: {exc}") from None


def load_pruned(path: str | Path, dtype: torch.dtype | str | None = None,
                device: str = "cpu") -> nn.Module:
    """Load a folder written after :func:`pruning.apply_plan`, whatever the plan.

    When the config describes the model, this is plain ``from_pretrained``. Otherwise the
    model class is subclassed so that its constructor applies the plans recorded since the
    config last described the model (``replay``) to the freshly built (meta) model;
    ``from_pretrained`` then loads the saved weights into those shapes with its usual
    checkpoint renaming and strict shape checks. The config is the folder's own
    ``config.json`` (edits to it are kept), and the dtype the one it was saved in unless
    ``dtype`` is given.

    Every tensor in the folder ends up in the model: one that the model class does not
    create (a bias added after pruning, e.g. by compensation) is added to its layer when
    that layer is a standard one that reads it (``Linear``, ``Conv1D``, ``LayerNorm``);
    otherwise, and when a weight of the model is missing from the folder, ``ValueError``
    names the keys instead of dropping or inventing them.
    """
    from transformers import AutoConfig

    path = _local_folder(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{str(path)!r} is not a model folder (expected a config.json in it)")
    config = AutoConfig.from_pretrained(path)
    record = getattr(config, RECORD_KEY, None)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else (dtype or "auto")
    replay = _replay(config, record)
    with _quiet_report(bool((record or {}).get("added"))):
        model, info = _load(path, config, record, replay, dtype)
    _restore_every_tensor(model, path, info)
    if replay:
        _restore_buffers(model, (record or {}).get("buffers") or {})
    return model.to(device).eval()


def _restore_buffers(model: nn.Module, values: dict[str, list]) -> None:
    """Put back the recorded non-persistent buffers (see ``apply_plan``'s record): a build
    recomputes them from sizes that the pruned model no longer has. Buffers the build does not
    make (a forward registers them) or makes at another shape (tables grown to the longest
    input so far) are left to the model's code, which computes them again."""
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for name, value in values.items():
            buffer = buffers.get(name)
            data = torch.tensor(value, dtype=torch.float64)
            if buffer is not None and tuple(buffer.shape) == tuple(data.shape):
                buffer.copy_(data.to(buffer.dtype))


@contextmanager
def _quiet_report(quiet: bool):
    """No load report for the tensors the record says were added (they are restored and
    checked here, every one of them), while ``from_pretrained`` runs."""
    if not quiet:
        yield
        return
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _load(path: Path, config, record: dict | None, replay, dtype):
    """``(model, loading info)``: plain ``from_pretrained``, or a subclass whose constructor
    replays the plans and creates the tensors added after pruning (as placeholders that the
    load fills through transformers' own conversions: a bias stored merged with others on
    disk is split by the sizes of the model's parameters, so they must exist before)."""
    added = list((record or {}).get("added") or ())
    if not replay and not added:
        return _model_class(config).from_pretrained(path, dtype=dtype, output_loading_info=True)
    base_config, plans = replay or (config, [])
    base = _model_class(base_config)

    def __init__(self, cfg, *args, **kwargs):  # noqa: N807 - a constructor for the subclass
        base.__init__(self, cfg, *args, **kwargs)
        _tie_as_saved(self)
        for plan, attributes in plans:  # the attributes verified when it was pruned
            apply_plan(self, plan, attributes=attributes)
        if plans:
            _tolerant_init(self)
        _add_placeholders(self, added)

    # same name and module as the library class, so checkpoint renamings still apply
    pruned_class = type(base.__name__, (base,), {"__init__": __init__, "__module__": base.__module__,
                                                 "__qualname__": base.__qualname__,
                                                 REPLAYS_PLANS: True})
    model, info = pruned_class.from_pretrained(path, config=base_config, dtype=dtype,
                                               output_loading_info=True)
    setattr(model.config, RECORD_KEY, record)
    return model, info


def _add_placeholders(model: nn.Module, names: list[str]) -> None:
    """Zero tensors for the recorded added ``names`` on the standard layers that read them
    (others are left to ``_restore_every_tensor``'s refusal)."""
    modules = dict(model.named_modules())
    for key in names:
        owner, _, name = key.rpartition(".")
        module = modules.get(owner)
        if module is None or not _reads(module, name):
            continue
        weight = module.weight
        shape = (tuple(module.normalized_shape) if isinstance(module, nn.LayerNorm)
                 else (weight.shape[output_dim(module)],))
        module.register_parameter(name, nn.Parameter(weight.new_zeros(shape),
                                                     requires_grad=weight.requires_grad))


def _tolerant_init(model: nn.Module) -> None:
    """Weight initialisation that skips a module whose init code assumes the dense sizes
    (Zamba's mixer reshapes by a head size only its init reads). ``from_pretrained`` runs it
    for tensors the folder lacks: a missing parameter fails the load afterwards anyway
    (``_restore_every_tensor``); a module with buffers only its init computes cannot be
    skipped, and fails with that reason."""
    for sub in model.modules():
        init = getattr(sub, "_init_weights", None)
        if init is None or not hasattr(sub, "_initialize_weights"):
            continue

        def tolerant(module, init=init):
            try:
                init(module)
            except Exception as error:  # noqa: BLE001 - init code written for the dense sizes
                if any(True for _ in _own_buffers(module)):
                    raise ValueError(f"cannot initialise the buffers of a pruned "
                                     f"{type(module).__name__} ({type(error).__name__}: {error})"
                                     ) from error

        sub._init_weights = tolerant


def _own_buffers(module: nn.Module):
    """The non-persistent buffers of ``module`` itself: values only its init computes."""
    persistent = set(module.state_dict(keep_vars=True))
    return (name for name, _ in module.named_buffers(recurse=False) if name not in persistent)


def _tie_as_saved(model: nn.Module) -> None:
    """Tie the weights the saved model shared, while ``from_pretrained`` builds it.

    ``from_pretrained`` ties only after construction, and inside it ``tie_weights`` makes
    copies (its empty-weights context re-creates every registered parameter). Built untied,
    the output embedding splits the hidden stream into other groups than the saved model
    had, and the plans would cut other channels; so the parameter objects are shared here
    directly.
    """
    expanded = getattr(model, "get_expanded_tied_weights_keys", None)
    for target, source in (expanded(all_submodels=True) if expanded else {}).items():
        parent_name, _, name = target.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        try:
            shared = model.get_parameter(source)
        except AttributeError:
            continue
        if name in parent._parameters:
            parent._parameters[name] = shared


def _replay(config, record: dict | None):
    """``(config to build, plans to apply to it)``, or ``None`` when ``config`` describes
    the model. Folders written before ``replay`` was recorded rebuild from the original
    config and every plan."""
    if not record or record.get("config_exact", True) or record.get("replay", None) == []:
        return None  # the config describes the shapes (added tensors are restored after)
    base = copy.deepcopy(config)
    if hasattr(base, RECORD_KEY):
        delattr(base, RECORD_KEY)
    if "replay" in record:
        settings = record.get("attributes")
        if not isinstance(settings, list) or len(settings) != len(record["replay"]):
            settings = [None] * len(record["replay"])  # written before they were recorded
        return base, list(zip(record["replay"], settings, strict=True))
    original = type(config).from_dict(record["original_config"])
    original.dtype = config.dtype  # the dtype the folder was saved in ("auto" reads it)
    return original, [(plan, None) for plan in record["plans"]]


def _restore_every_tensor(model: nn.Module, path: Path, info: dict) -> None:
    """Add the folder's tensors that the model class does not create (see load_pruned)."""
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise ValueError(f"{str(path)!r} lacks {len(missing)} weight(s) of the model, e.g. "
                         f"{missing[:3]}; refusing to leave them randomly initialised")
    modules = dict(model.named_modules())
    holders = weight_holders(model)

    def share(module: nn.Module, name: str, tensor: nn.Parameter) -> None:
        for _, holder in holders.get(id(getattr(module, "weight", None))) or [("", module)]:
            if _reads(holder, name):  # tied layers share the added tensor
                holder.register_parameter(name, tensor)

    for key in (getattr(model.config, RECORD_KEY, None) or {}).get("added") or ():
        owner, _, name = key.rpartition(".")  # loaded into its placeholder
        if isinstance(getattr(modules.get(owner), name, None), nn.Parameter):
            share(modules[owner], name, getattr(modules[owner], name))
    extra = sorted(info.get("unexpected_keys") or ())
    if not extra:
        return
    tensors = _read_tensors(path, extra, load_names(model))
    refused = []
    for key in extra:  # a folder whose record does not list what was added
        owner, _, name = key.rpartition(".")
        module = modules.get(owner)
        if key not in tensors or module is None or not _reads(module, name):
            refused.append(key)
            continue
        template = next(module.parameters())
        share(module, name, nn.Parameter(tensors[key].to(device=template.device),
                                         requires_grad=template.requires_grad))
    if refused:
        raise ValueError(f"{str(path)!r} holds {len(refused)} tensor(s) that the model has no "
                         f"place for, e.g. {refused[:3]}; refusing to drop them")


def _reads(module: nn.Module, name: str) -> bool:
    """Whether ``module`` is a standard layer whose forward reads attribute ``name`` (None now)."""
    standard = isinstance(module, (nn.Linear, nn.LayerNorm)) or type(module).__name__ == "Conv1D"
    return standard and name in ("bias", "weight") and getattr(module, name, None) is None


def _read_tensors(path: Path, keys: list[str], load_name=lambda key: key
                  ) -> dict[str, torch.Tensor]:
    """``{loaded name: tensor}`` of the saved tensors whose loaded name is in ``keys``."""
    from safetensors import safe_open

    wanted, found = set(keys), {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                name = key if key in wanted else load_name(key)
                if name in wanted and name not in found:
                    found[name] = handle.get_tensor(key)
    return found


def _local_folder(path: str | Path) -> Path:
    """``path`` itself, or the local snapshot of a hub repository id (downloaded when online)."""
    if Path(path).exists() or not isinstance(path, str) or path.count("/") > 1:
        return Path(path)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path))
    except Exception as exc:  # offline, unknown repo, ...: say what was asked for
        raise ValueError(f"{path!r} is neither a model folder nor a reachable Hugging Face "
                         f"repository ({type(exc).__name__})") from None


def _model_class(config) -> type:
    """The class the folder was saved from (``config.architectures``), else the causal-LM
    class transformers maps the config to (some text configs map to none of their own)."""
    import transformers
    from transformers import AutoModelForCausalLM

    for name in getattr(config, "architectures", None) or ():
        found = getattr(transformers, name, None)
        if isinstance(found, type) and issubclass(found, transformers.PreTrainedModel):
            return found
    return AutoModelForCausalLM._model_mapping[type(config)]
