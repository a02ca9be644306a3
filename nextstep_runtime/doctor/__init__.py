"""`doctor`: what this install can do and why not (environment.py), a self-check of the computation on a small
random model (self_check.py), the warnings each loader setting deserves here (warnings.py), as JSON or text
(text.py)."""

from .report import doctor_report, loader_warnings
from .text import render_text

__all__ = ["doctor_report", "loader_warnings", "render_text"]
