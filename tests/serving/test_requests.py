import threading
import time

import grpc
import pytest

from serving import requests as requests_lib


def test_pixel_budget_queues_requests_and_drops_those_that_expire():
    from deep_retrieval.data.images import MAX_PIXELS

    budget = requests_lib.PixelBudget(MAX_PIXELS)
    entered = []

    def second():
        with budget.hold(10):
            entered.append(time.time())

    with budget.hold(MAX_PIXELS):
        started = time.time()
        waiter = threading.Thread(target=second)
        waiter.start()
        time.sleep(0.5)
        assert not entered  # queued behind the first request
    waiter.join(5)
    assert entered and entered[0] - started >= 0.5 and budget.used == 0

    class Context:
        def __init__(self, active=True, remaining=None):
            self.active, self.remaining = active, remaining

        def is_active(self):
            return self.active

        def time_remaining(self):
            return self.remaining

    with budget.hold(MAX_PIXELS):
        for context, code in ((Context(remaining=-0.1), grpc.StatusCode.DEADLINE_EXCEEDED),
                              (Context(active=False), grpc.StatusCode.CANCELLED)):
            with pytest.raises(requests_lib.InvalidRequest) as refused:
                with budget.hold(10, context):
                    pass
            assert refused.value.code == code
    assert budget.used == 0
    with pytest.raises(ValueError, match="below one image"):
        requests_lib.PixelBudget(1000)
