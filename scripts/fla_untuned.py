"""Run FLA's Triton kernels without their autotune, for correctness tests on a fresh GPU machine.

  PYTHONPATH=scripts python -m pytest -p fla_untuned tests/test_fla_device.py ...
  python scripts/fla_untuned.py OUT_DIR        (only write the config files, see below)

Why: FLA autotunes each kernel at each new shape on first use; a test of FLA's layer against
kda_ext's took ~150 s a configuration on a fresh H100 (session 13), device time spent on nothing
such a test looks at. FLA (0.6 and later) reads `$FLA_CONFIG_DIR/<kernel>.json` for the kernels
decorated with its `fla_cache_autotune` and, with `FLA_CACHE_MODE=default`, runs the file's
`default_config` without tuning. As a pytest plugin (or `install()` before FLA is imported) this
module:
- points FLA_CACHE_MODE / FLA_CONFIG_DIR at a temporary folder (unless already set);
- makes `triton.autotune` FLA's `fla_cache_autotune` before FLA is imported (FLA's own
  `configure_fla_cache_autotune()` cannot: importing it imports FLA, whose layers and modules
  define their kernels with plain `triton.autotune` on import), so those kernels read the
  files too;
- imports FLA's op and module packages and writes, per kernel name, the first config of the
  kernel's own list (for a name several kernels share: the first config all of them list; none
  in common: no file, they still autotune). A config picked this way is valid but not tuned: never time FLA with it.
"""
import importlib
import importlib.util
import json
import os
import pkgutil
import sys
import tempfile


def _fla_cache_module():
    """FLA's fla/ops/utils/cache.py loaded on its own, without importing the fla package."""
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("fla_untuned: FLA (flash-linear-attention) is not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], "ops", "utils", "cache.py")
    module_spec = importlib.util.spec_from_file_location("_fla_untuned_cache", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _is_cached_autotuner(obj):
    return hasattr(obj, "kernel_name") and hasattr(obj, "maybe_load_cached_config") and hasattr(obj, "configs")


def autotuners():
    """(kernel name, autotuner) of every FLA kernel that reads FLA's config files."""
    import fla.modules
    import fla.ops

    seen = {}
    for package in (fla.ops, fla.modules):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            try:
                module = importlib.import_module(info.name)
            except Exception:  # optional backends (tilelang, ...) absent here
                continue
            for obj in vars(module).values():
                for _ in range(4):  # @triton.heuristics wraps the autotuner: follow .fn
                    if _is_cached_autotuner(obj) or not hasattr(obj, "fn"):
                        break
                    obj = obj.fn
                if _is_cached_autotuner(obj):
                    seen[id(obj)] = (obj.kernel_name, obj)
    return list(seen.values())


def _config_dict(config):
    out = {"kwargs": dict(config.kwargs), "num_warps": config.num_warps,
           "num_stages": config.num_stages, "num_ctas": getattr(config, "num_ctas", 1) or 1}
    if getattr(config, "maxnreg", None) is not None:
        out["maxnreg"] = config.maxnreg
    return out


def write_configs(out_dir):
    """Writes the config files; returns (written, names skipped)."""
    by_name = {}
    for name, tuner in autotuners():
        by_name.setdefault(name, []).append(tuner)
    os.makedirs(out_dir, exist_ok=True)
    written, skipped = 0, []
    for name, tuners in sorted(by_name.items()):
        # Several kernels may share a name: the first config of the first one's list that every
        # one of them lists (valid for each), or none.
        lists = [[_config_dict(c) for c in t.configs] for t in tuners if t.configs]
        common = [c for c in (lists[0] if lists else []) if all(c in other for other in lists[1:])]
        if not common:
            skipped.append(name)
            continue
        with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
            json.dump({"kernel_name": name, "default_config": common[0]}, f, indent=1)
        written += 1
    return written, skipped


def install():
    """Before FLA is imported: FLA's kernels read untuned default configs. Returns the folder."""
    if "fla" in sys.modules:
        raise RuntimeError("fla_untuned.install() must run before FLA is imported")
    os.environ.setdefault("FLA_CACHE_MODE", "default")
    config_dir = os.environ.setdefault("FLA_CONFIG_DIR", tempfile.mkdtemp(prefix="fla_untuned_"))
    import triton

    triton.autotune = _fla_cache_module().fla_cache_autotune
    written, skipped = write_configs(config_dir)
    print(f"fla_untuned: FLA runs {written} kernels with untuned default configs from {config_dir}"
          + (f" ({len(skipped)} shared names still autotune)" if skipped else ""), file=sys.stderr)
    return config_dir


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    written, skipped = write_configs(sys.argv[1])
    print(f"fla_untuned: {written} kernel configs in {sys.argv[1]}; skipped: {', '.join(skipped) or 'none'}")
elif os.environ.get("FLA_UNTUNED", "1") != "0" and "fla" not in sys.modules and \
        importlib.util.find_spec("fla") is not None:
    # Imported as a pytest plugin (-p fla_untuned) or by a script's first lines; without FLA
    # installed there is nothing to do (the FLA tests skip). A failure here must not stop the
    # test run it was meant to shorten: FLA then autotunes as usual.
    try:
        install()
    except Exception as error:  # noqa: BLE001
        print(f"fla_untuned: not installed ({type(error).__name__}: {error}); FLA will autotune",
              file=sys.stderr)
