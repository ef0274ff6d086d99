"""The grid's worker errors: one that does not unpickle reaches the grid as its text."""
import pytest


def test_an_error_that_does_not_unpickle_reaches_the_grid_as_its_text():
    """A worker's exception whose constructor takes more than its message pickles but does not
    unpickle: the grid's process got a TypeError about that constructor instead of the error."""
    import pickle

    from kd2m.harness.workers import _sendable
    from kd2m.training.step import TermFailure
    e = TermFailure(object(), ValueError("bad option"))
    with pytest.raises(TypeError):
        pickle.loads(pickle.dumps(e))
    sent = pickle.loads(pickle.dumps(_sendable(e)))
    assert isinstance(sent, RuntimeError) and str(sent) == "TermFailure: bad option"
    plain = ValueError("x")
    assert _sendable(plain) is plain
