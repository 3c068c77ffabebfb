"""Every public name is documented: the objects each public package exports in ``__all__``, and
their public methods and properties (an override may inherit its base class's docstring)."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil

import qcompile


def _public_modules():
    yield qcompile
    for info in pkgutil.walk_packages(qcompile.__path__, "qcompile."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            yield importlib.import_module(info.name)


def _documented_in_bases(cls: type, name: str) -> bool:
    for base in cls.__mro__[1:]:
        member = vars(base).get(name)
        if member is not None:
            f = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
            if (getattr(f, "__doc__", None) or "").strip():
                return True
    return False


def undocumented() -> list[str]:
    seen: set[int] = set()
    missing = []
    for module in _public_modules():
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            if id(obj) in seen or not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            seen.add(id(obj))
            qual = f"{obj.__module__}.{obj.__qualname__}"
            doc = (obj.__doc__ or "").strip()
            if not doc or (inspect.isclass(obj) and doc.startswith(f"{obj.__name__}(")):  # dataclass default
                missing.append(qual)
            if not inspect.isclass(obj):
                continue
            fields = {f.name for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else set()
            for attr, member in vars(obj).items():
                if attr.startswith("_") or attr in fields:  # a dataclass field is documented with its class
                    continue
                f = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
                if inspect.isfunction(f) and not (f.__doc__ or "").strip() and not _documented_in_bases(obj, attr):
                    missing.append(f"{qual}.{attr}")
    return missing


def test_every_public_name_has_a_docstring():
    missing = undocumented()
    assert not missing, f"{len(missing)} public names without a docstring:\n" + "\n".join(missing)
