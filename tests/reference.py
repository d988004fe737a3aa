"""The reference parameter trees the tests compare against, kept in the repository (`tests/data/`).

Each file maps every '/'-joined parameter path of the reference `Gemma3n_E4B()` (and of
`Gemma3n_E4B(text_only=True)`) to its shape and dtype, as measured on the reference library.
"""

import pathlib

DATA_DIR = pathlib.Path(__file__).resolve().parent / 'data'
E4B_PARAMS_JSON = DATA_DIR / 'gemma3n_e4b_params.json'
E4B_TEXT_PARAMS_JSON = DATA_DIR / 'gemma3n_e4b_text_only_params.json'
