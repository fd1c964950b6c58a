import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    """Every device-dependent test runs on CPU, and on CUDA when one is present."""
    return torch.device(request.param)


@pytest.fixture(scope="module")
def one_cpu_thread():
    """Tiny convolutions: one intra-op thread is as fast on an idle CPU and avoids OpenMP
    spin-waiting when the cores are shared (2 threads ran these tests ~5-9x slower under load).
    Use per module: ``pytestmark = pytest.mark.usefixtures("one_cpu_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def simulate_pair(tmp_path_factory):
    """``simulate_pair(**SimulationConfig fields)`` → (noisy, clean) images ``(n, d, d)`` float32
    of a stack simulated with that configuration (clean: ``cpCleanImageName``)."""
    from cryoprior.io.stack import ParticleStack
    from cryoprior.sim.dataset import SimulationConfig, simulate_dataset

    def make(**config):
        out = tmp_path_factory.mktemp("sim") / "sim"
        simulate_dataset(SimulationConfig(**config), out)
        stack = ParticleStack.from_file(out / "particles.star")
        return stack.images(), stack.read_image_column("cpCleanImageName")

    return make
