"""Broken optional installs, as users have them: a flash-attn wheel built for another torch or CUDA is installed
(found on the path) but fails when imported, with "DLL load failed" on Windows or an undefined symbol on Linux.

The package is laid out as flash-attn's is: `flash_attn/__init__.py` imports its interface, which imports the
compiled `flash_attn_2_cuda` extension; here that extension raises what a mismatched build raises.
"""

from __future__ import annotations

from pathlib import Path

FLASH_ATTN_FAILURES = {
    "windows-dll": ("ImportError", "DLL load failed while importing flash_attn_2_cuda: The specified procedure could "
                                   "not be found."),
    "linux-symbol": ("OSError", "flash_attn_2_cuda.cpython-311-x86_64-linux-gnu.so: undefined symbol: "
                                "_ZN3c105ErrorC2ENS_14SourceLocationENSt7__cxx1112basic_stringIcSt11char_traitsIcE"),
}


def broken_flash_attn(folder: Path, failure: str = "windows-dll") -> Path:
    """A folder to put on the path, holding a `flash_attn` package whose compiled extension fails as `failure` (a key
    of FLASH_ATTN_FAILURES) says."""
    error, message = FLASH_ATTN_FAILURES[failure]
    package = folder / "flash_attn"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('__version__ = "2.7.4"\n'
                                         "from flash_attn.flash_attn_interface import flash_attn_func\n")
    (package / "flash_attn_interface.py").write_text("import flash_attn_2_cuda as flash_attn_gpu\n\n\n"
                                                     "def flash_attn_func(*args, **kwargs):\n"
                                                     "    return flash_attn_gpu.fwd(*args, **kwargs)\n")
    (folder / "flash_attn_2_cuda.py").write_text(f"raise {error}({message!r})\n")
    return folder


def working_flash_attn(folder: Path) -> Path:
    """A folder holding a `flash_attn` package that imports (its kernel is never reached off CUDA GPUs)."""
    package = folder / "flash_attn"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("def flash_attn_func(*args, **kwargs):\n"
                                         "    raise AssertionError('flash-attn kernel called off a CUDA GPU')\n")
    return folder
