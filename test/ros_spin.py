"""An executor spinning in its own thread for a test, stopped so that the thread is gone before its node and context.

`executor.shutdown()` alone returns while the spin thread may still be inside a wait; once the context is shut down
such a thread busy-looped holding the GIL and starved the test's main thread (CI hung 18 min, py-spy + strace). Every
test that spins an executor in a thread starts it with `Spinner(executor)` and ends it with `stop()`.
"""
import threading


class Spinner:
    """executor.spin() in a daemon thread; stop() shuts the executor down and waits for the thread to leave."""

    def __init__(self, executor):
        self.executor = executor
        self.thread = threading.Thread(target=executor.spin, daemon=True)
        self.thread.start()

    def stop(self, timeout=10.0):
        self.executor.shutdown()
        self.thread.join(timeout=timeout)
        assert not self.thread.is_alive(), f'the executor did not stop spinning within {timeout:g} s'
