"""The shipped demo policy runs where neither torch nor transformers can be imported (the robot-side install:
requirements-runtime.txt). A meta-path blocker in sitecustomize makes every import of them fail in a subprocess."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BLOCKER = '''
import importlib.abc
import sys


class _Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers'):
            raise ImportError(f'{name} is blocked: the runtime must not import it')
        return None


sys.meta_path.insert(0, _Blocked())
'''

SCRIPT = '''
import json, sys
try:
    import torch  # noqa: F401
    sys.exit('the blocker did not work')
except ImportError:
    pass
from blockvla_ros.runtime.runner import PolicyRunner
from blockvla_ros.tasks import TabletopEnv

runner = PolicyRunner.load('models/demo', engine='onnxruntime', threads=1)
rows = []
for task in ('touch_red', 'touch_blue'):
    obs = TabletopEnv(task, seed=3).reset()
    pred = runner.predict(obs.image, obs.instruction, state=obs.state)
    rows.append(pred.actions.tolist())
print(json.dumps({'actions': rows, 'tokenizer': type(runner.preprocessor.text).__name__,
                  'rate': runner.config.control_rate_hz, 'kinds': runner.config.kinds,
                  'loaded': sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))}))
'''


def test_demo_policy_runs_without_torch_and_transformers(tmp_path):
    (tmp_path / 'sitecustomize.py').write_text(BLOCKER)
    env = {'PYTHONPATH': str(tmp_path), 'PATH': '/usr/bin:/bin', 'OMP_NUM_THREADS': '1'}
    proc = subprocess.run([sys.executable, '-c', SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out['loaded'] == []
    assert out['tokenizer'] == 'FileTextTokenizer'
    assert out['rate'] == 10.0 and out['kinds'] == ['delta', 'delta', 'absolute']
    red, blue = out['actions']
    assert len(red) == 8 and all(len(a) == 3 for a in red)
    assert red != blue  # the instruction (read through tokenizer.json) reaches the policy
