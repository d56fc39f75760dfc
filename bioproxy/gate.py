"""Users first: the requests in flight, and the evaluations that give way to them.

The proxy reports every request that holds or waits for a slot (user_started, then
user_finished once its answer is sent). With only_when_idle (warmup_only_when_idle), an
evaluation waits until no user is in flight, and one under way is cancelled the moment a
user arrives: its connection is shut, so llama-server stops it after the batch under way.
A restore takes milliseconds and goes ahead regardless.
"""

from gevent.event import Event


class Gate:
    """Counts the users in flight; holds evaluations off while there are any."""

    def __init__(self, only_when_idle, on_idle=None):
        self.only_when_idle = only_when_idle
        self.on_idle = on_idle  # called when the last user in flight is done
        self.users = 0
        self.idle = Event()  # set while no user is in flight
        self.idle.set()
        self.runs = set()  # the evaluations under way, each with a cancel()

    def user_started(self):
        self.users += 1
        self.idle.clear()
        self.cancel_runs()

    def user_finished(self):
        self.users -= 1
        if self.users == 0:
            self.idle.set()
            if self.on_idle is not None:
                self.on_idle()

    def holds_off(self):
        """Whether an evaluation must not go on now."""
        return self.only_when_idle and self.users > 0

    def wait_until_idle(self):
        """Before an evaluation starts: until no user is in flight (if warmups wait)."""
        if self.only_when_idle:
            self.idle.wait()

    def cancel_runs(self):
        """Shut the running evaluations' connections down, so llama-server stops them."""
        if self.only_when_idle:
            for run in list(self.runs):
                run.cancel()
