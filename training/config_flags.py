"""absl flags over the `TrainConfig` dataclasses.

Every field of `TrainConfig` (and of its nested `DescriptorConfig` and
`SyntheticConfig`, the latter prefixed ``synthetic_``) becomes a flag whose
help text is the field's documentation (`config.setting`). A flag left unset takes the value of
the chosen ``--preset``.
"""

import dataclasses
import typing

from absl import flags

from deep_retrieval import config as config_lib
from deep_retrieval.presets import PRESETS

NESTED = {"descriptor": "", "synthetic": "synthetic_"}
NONE_WORDS = ("", "none", "null")


def _field_docs(cls):
    """``{field: help}`` from each field's ``metadata["help"]`` (`config.setting`)."""
    return {f.name: f.metadata["help"] for f in dataclasses.fields(cls) if "help" in f.metadata}


def _kind(tp):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union and type(None) in args:
        inner = [a for a in args if a is not type(None)][0]
        return "optional_" + _kind(inner)
    if origin in (tuple, typing.Tuple):
        return "floats"
    return {bool: "bool", int: "int", float: "float", str: "str"}[tp]


def _fields(cls):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        yield f.name, hints[f.name]


def define_flags(flag_values=flags.FLAGS):
    """Defines ``--preset`` and one flag per configuration field."""
    fv = {"flag_values": flag_values}
    flags.DEFINE_enum(
        "preset", "demo", sorted(PRESETS),
        "Starting configuration: 'demo' (ImageNet EfficientNet-Lite0 fine-tuned on views of "
        "real photographs, about 12 minutes on 2 CPU cores), 'tiny' (small CNN from scratch "
        "on procedural facades, for tests) or 'paper' (ResNet-101, 800 px, as published). "
        "Other flags override it.",
        **fv,
    )
    groups = [(config_lib.TrainConfig, "")] + [
        (typing.get_type_hints(config_lib.TrainConfig)[name], prefix)
        for name, prefix in NESTED.items()
    ]
    for cls, prefix in groups:
        docs = _field_docs(cls)
        for name, tp in _fields(cls):
            if name in NESTED and cls is config_lib.TrainConfig:
                continue
            help_text = docs.get(name, name) + " (default: from --preset)"
            kind = _kind(tp)
            flag = prefix + name
            if kind == "bool":
                flags.DEFINE_boolean(flag, None, help_text, **fv)
            elif kind == "int":
                flags.DEFINE_integer(flag, None, help_text, **fv)
            elif kind == "float":
                flags.DEFINE_float(flag, None, help_text, **fv)
            elif kind == "floats":
                flags.DEFINE_list(flag, None, help_text, **fv)
            else:
                suffix = " ('none' for none)" if kind.startswith("optional") else ""
                flags.DEFINE_string(flag, None, help_text + suffix, **fv)


def _parse(kind, value, flag):
    if kind == "floats":
        return tuple(float(v) for v in value)
    if kind.startswith("optional_"):
        if str(value).lower() in NONE_WORDS:
            return None
        base = kind[len("optional_"):]
        try:
            return int(value) if base == "int" else value
        except ValueError:
            raise ValueError(f"--{flag}: expected an integer or 'none', got {value!r}") from None
    return value


def config_from_flags(values=None):
    """The `TrainConfig` of the preset with every set flag applied."""
    values = values or flags.FLAGS
    cfg = PRESETS[values.preset]()
    updates = {}
    for name, tp in _fields(config_lib.TrainConfig):
        if name in NESTED:
            continue
        value = getattr(values, name)
        if value is not None:
            updates[name] = _parse(_kind(tp), value, name)
    cfg = dataclasses.replace(cfg, **updates)
    for attr, prefix in NESTED.items():
        sub = getattr(cfg, attr)
        sub_updates = {}
        for name, tp in _fields(type(sub)):
            value = getattr(values, prefix + name)
            if value is not None:
                sub_updates[name] = _parse(_kind(tp), value, prefix + name)
        setattr(cfg, attr, dataclasses.replace(sub, **sub_updates))
    return cfg


def define_dataclass_flags(cls, flag_values=flags.FLAGS):
    """One flag per field of a flat dataclass, defaulting to the field's
    default; the help text is the field's documentation (`config.setting`)."""
    docs = _field_docs(cls)
    defaults = cls()
    for name, tp in _fields(cls):
        kind, default = _kind(tp), getattr(defaults, name)
        help_text = docs.get(name, name)
        definer = {"bool": flags.DEFINE_boolean, "int": flags.DEFINE_integer,
                   "float": flags.DEFINE_float, "str": flags.DEFINE_string}[kind]
        definer(name, default, help_text, flag_values=flag_values)


def dataclass_from_flags(cls, values=None):
    """An instance of ``cls`` from the flags `define_dataclass_flags` made."""
    values = values or flags.FLAGS
    return cls(**{name: getattr(values, name) for name, _ in _fields(cls)})
