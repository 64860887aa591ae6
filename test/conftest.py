"""Shared test set-up: DDS stays on loopback, each test session gets its own ROS domain."""
import os

os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
os.environ.setdefault('ROS_DOMAIN_ID', str(100 + os.getpid() % 100))
os.environ.setdefault('OMP_NUM_THREADS', '2')

import pytest  # noqa: E402


def _cuda_available():
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


@pytest.fixture(scope='module')
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is both faster and reproducible.
    A module opts in with `pytestmark = pytest.mark.usefixtures('one_thread')`."""
    import torch
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# gpu_check.sh --dry-run-cpu sets this: the requires_cuda tests then run their whole bodies on the CPU (capture off,
# no GPU memory figures), so their code has run before the one GPU session that can check them
GPU_TESTS_ON_CPU = os.environ.get('BLOCKVLA_GPU_TESTS_ON_CPU') == '1'


@pytest.fixture(scope='session')
def gpu_device():
    """The device of the requires_cuda tests: 'cuda', or 'cpu' in gpu_check.sh's dry run."""
    return 'cuda' if _cuda_available() else 'cpu'


def pytest_collection_modifyitems(config, items):
    if _cuda_available() or GPU_TESTS_ON_CPU:
        return
    skip = pytest.mark.skip(reason='needs an NVIDIA GPU and a CUDA build of torch (torch.cuda.is_available() is '
                            'False here)')
    for item in items:
        if 'requires_cuda' in item.keywords:
            item.add_marker(skip)
