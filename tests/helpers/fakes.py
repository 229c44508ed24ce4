"""Small stand-ins shared by the data, engine and seed tests."""


class ListSource:
    """A random-access source that is not array-backed (as a grain/TFDS data source)."""

    def __init__(self, arrays):
        n = len(next(iter(arrays.values())))
        self._examples = [{k: v[i] for k, v in arrays.items()} for i in range(n)]

    def __len__(self):
        return len(self._examples)

    def __getitem__(self, i):
        return dict(self._examples[i])


def kill_after_epoch(monkeypatch, epochs: int) -> None:
    """Makes the trainer raise KeyboardInterrupt right after it wrote the history of epoch
    ``epochs`` (a simulated kill); ``monkeypatch.undo()`` or a fresh monkeypatch restores it."""
    from mcr_jax import engine

    real = engine.write_history

    def die(workdir, history):
        real(workdir, history)
        if len(history) == epochs:
            raise KeyboardInterrupt(f"simulated kill after epoch {epochs}")

    monkeypatch.setattr(engine, "write_history", die)
