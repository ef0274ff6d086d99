"""Sphinx configuration of kd2m's documentation: built offline, warnings as errors (.ci/run).

The reference pages (command line, configuration keys, the registries' tables) are generated
from the code at build time by ``_ext/kd2m_reference.py``, so they cannot drift from it.
"""
import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE / "_ext"))

import kd2m  # noqa: E402

project = "kd2m"
author = "The kd2m developers"
copyright = "2026, The kd2m developers"
release = kd2m.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_parser",
    "kd2m_reference",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
# pages that other pages include (the registries' tables, the experiments' tables): not pages of their own
exclude_patterns = ["_build", "api/_autosummary_templates", "_generated/terms.md", "_generated/*_results.md", "_generated/*_env.md",
                    "_generated/digits_headline.md"]
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

autosummary_generate = True
autosummary_imported_members = False
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = True
# the integrations' libraries are optional extras: a site built with [docs] alone mocks them
autodoc_mock_imports = [name for name in ("transformers", "trl", "lightning") if importlib.util.find_spec(name) is None]

html_theme = "alabaster"
html_title = f"kd2m {release}"
html_static_path: list[str] = []

# A numpy-style "References" section lists its sources without citing each one in the text;
# a name re-exported by a package (``kd2m.losses.TermContext``) has two documented homes.
suppress_warnings = ["ref.footnote", "ref.python"]
