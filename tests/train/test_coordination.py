"""Stop requests in one process: SIGTERM and SIGINT both ask the step loop to stop (a second one interrupts at
once), and the previous handlers come back. The multi-process agreement is tested through the CLI in
tests/parallel/test_multihost.py."""

import signal

import pytest

from mantis_jax.train import coordination


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_requests_catch_sigterm_and_sigint(sig):
    before = {s: signal.getsignal(s) for s in coordination.STOP_SIGNALS}
    with coordination.StopRequests() as stop:
        assert not stop.should_stop(1)
        signal.raise_signal(sig)
        assert stop.should_stop(2) and stop.should_stop(3)
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(sig)
    assert {s: signal.getsignal(s) for s in coordination.STOP_SIGNALS} == before


def test_single_process_decisions_are_local():
    batches = [{"loss_mask": [1.0]}]
    assert coordination.same_count(batches) is batches
    assert coordination.gather_strings('{"a": 1}') == ['{"a": 1}']
    assert coordination.process_0_decides(True) and not coordination.Deadline(0.0, 1).passed(5)
    assert coordination.Deadline(1e-9, 1).passed(1)
