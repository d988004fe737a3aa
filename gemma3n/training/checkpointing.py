"""The train state on disk: an Orbax CheckpointManager in the run's folder, and the run's
configuration, so that `--resume` continues exactly and refuses another run's folder.

A checkpoint of step s holds the trainable params, the optimizer state, the step and the RNG
(one PyTree) and, as JSON, the data position (rows of the stream handed out). The folder also
holds `run_config.json`, written when the run starts: a resume must have the same configuration
(everything that shapes the state or the sequence of batches), else it is refused before
anything is written.

Example:
    >>> store = StateStore(out / STATE_FOLDER, keep=3)
    >>> store.save(state, data_position=64)
    >>> state, position = store.restore(abstract_state)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from gemma3n.training.step import TrainState

STATE_FOLDER = 'train_state'
RUN_CONFIG_FILE = 'run_config.json'
STATE_ITEM, META_ITEM = 'state', 'meta'
DATA_POSITION = 'data_position'


class StateStore:
    """The Orbax checkpoints of a run's train state in `folder`, keeping the last `keep`."""

    def __init__(self, folder: Path, keep: int):
        self.folder = Path(folder)
        self._manager = ocp.CheckpointManager(
            self.folder.absolute(), options=ocp.CheckpointManagerOptions(max_to_keep=keep,
                                                                       create=True))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, state: TrainState, data_position: int) -> None:
        """Starts saving `state` (written in the background; `close` waits for it)."""
        self._manager.save(int(state.step), args=ocp.args.Composite(**{
            STATE_ITEM: ocp.args.StandardSave(_as_tree(state)),
            META_ITEM: ocp.args.JsonSave({DATA_POSITION: data_position})}))

    def restore(self, like: TrainState) -> tuple[TrainState, int]:
        """The latest checkpoint's state (shaped like `like`) and data position."""
        step = self._manager.latest_step()
        if step is None:
            raise ValueError(f'{self.folder} holds no checkpoint to resume from.')
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _as_tree(like))
        restored = self._manager.restore(step, args=ocp.args.Composite(**{
            STATE_ITEM: ocp.args.StandardRestore(abstract), META_ITEM: ocp.args.JsonRestore()}))
        tree = restored[STATE_ITEM]
        state = TrainState(step=tree['step'], trainable=tree['trainable'],
                           opt_state=jax.tree.unflatten(jax.tree.structure(like.opt_state),
                                                        jax.tree.leaves(tree['opt_state'])),
                           rng=tree['rng'])
        return state, int(restored[META_ITEM][DATA_POSITION])

    def close(self) -> None:
        """Waits for the saves in flight, then releases the folder."""
        self._manager.wait_until_finished()
        self._manager.close()


def _as_tree(state: TrainState) -> dict[str, Any]:
    return {'step': state.step, 'trainable': state.trainable, 'opt_state': state.opt_state,
            'rng': state.rng}


def check_run_config(out: Path, run_config: dict[str, Any], resume: bool) -> None:
    """Checks that folder `out` can take a new run, or that a resume matches its run.

    A new run refuses a folder that already holds a run; a resume refuses a folder of another
    configuration, naming what differs. Writes nothing (`claim_run_folder` does).
    """
    path = out / RUN_CONFIG_FILE
    if not resume:
        if path.exists() or (out / STATE_FOLDER).exists():
            raise ValueError(f'{out} already holds a fine-tuning run: pass --resume to continue '
                             'it, or choose another --out folder.')
        if out.exists() and not out.is_dir():
            raise ValueError(f'--out {out} is a file, not a folder.')
        return
    if not path.is_file():
        raise ValueError(f'--resume: {out} holds no fine-tuning run ({RUN_CONFIG_FILE} is missing).')
    try:
        stored = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f'--resume: {path} is not valid JSON: {error}') from None
    differences = [f'{key} was {stored.get(key)!r}, now {run_config.get(key)!r}'
                   for key in sorted(set(stored) | set(run_config))
                   if stored.get(key) != run_config.get(key)]
    if differences:
        raise ValueError(f'--resume: {out} is a run of another configuration: '
                         + '; '.join(differences))


def claim_run_folder(out: Path, run_config: dict[str, Any]) -> None:
    """Creates `out` and writes the run's configuration (that of a resumed run is already
    there, equal: `check_run_config`)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_CONFIG_FILE).write_text(json.dumps(run_config, indent=2, sort_keys=True) + '\n')
