"""Routing insight: where tokens go in MoE layers and where compute is spent in gated layers.

Everything here returns plain data (dicts, lists, floats, ints) so that it can go straight into
`all_results.json`, a model card or `json.dump`.

One module per concern:

- `collect`: recorders switched on during forwards, and `routing_summary` / `load_stats`;
- `tokens`: token-level views on texts, `inspect` and `compare`;
- `report`: terminal tables of their results;
- `figures`: the expert-load heatmap and per-token map (matplotlib);
- `commands`: `hf-condcomp inspect` / `compare`, model folders and text files.
"""

from .collect import find_recorders as find_recorders
from .collect import load_stats, routing_summary
from .collect import run_recorded as run_recorded
from .commands import add_inspect_parsers as add_inspect_parsers
from .commands import load_model_folder as load_model_folder
from .commands import read_texts as read_texts
from .figures import plot_expert_load as plot_expert_load
from .figures import plot_token_map as plot_token_map
from .figures import save_plots
from .report import format_compare as format_compare
from .report import format_inspect as format_inspect
from .tokens import compare, inspect
from .tokens import text_batches as text_batches

# What `from hf_condcomp.insight import *` gives; the other names above stay importable by name.
__all__ = ["routing_summary", "inspect", "compare", "load_stats", "save_plots"]
