"""Where the shared reference material lies: `shared/` beside the repository (as in CI)."""

import pathlib

REFERENCE_DIR = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'reference'
E4B_PARAMS_JSON = REFERENCE_DIR / 'gemma3n_e4b_params.json'
E4B_TEXT_PARAMS_JSON = REFERENCE_DIR / 'gemma3n_e4b_text_only_params.json'
