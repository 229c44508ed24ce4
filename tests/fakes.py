"""Small stand-ins shared by the data tests."""


class ListSource:
    """A random-access source that is not array-backed (as a grain/TFDS data source)."""

    def __init__(self, arrays):
        n = len(next(iter(arrays.values())))
        self._examples = [{k: v[i] for k, v in arrays.items()} for i in range(n)]

    def __len__(self):
        return len(self._examples)

    def __getitem__(self, i):
        return dict(self._examples[i])
