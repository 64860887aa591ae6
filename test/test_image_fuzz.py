"""Issue 13 item 2: every image decode is bounded. The bombs of the issue are refused before any pixel is allocated,
and a seeded random corpus (encodings, sizes, steps, compressed payloads, mutations, bombs) raises nothing but
ImageConversionError while the process' peak memory stays bounded (measured in a fresh subprocess)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from blockvla_ros.io.images import ImageConversionError, message_to_rgb8

from image_corpus import (bmp_rle8_bomb, compressed, jpeg_bomb_junk_after_app0, jpeg_many_scans, other_formats,
                          png_bomb)

HERE = Path(__file__).resolve().parent
FUZZ_CASES = 600
PEAK_GROWTH_LIMIT_MB = 200  # the largest corpus image is 2048x2048; one bomb decoded would be ~2,700 MB


def test_jpeg_with_junk_after_app0_is_refused_by_its_size():
    data = jpeg_bomb_junk_after_app0()
    assert len(data) < 1000
    with pytest.raises(ImageConversionError, match='too large: 30000x30000'):
        message_to_rgb8(compressed('rgb8; jpeg compressed bgr8', data))


def test_rle_bmp_and_other_formats_are_refused_before_decoding():
    assert len(bmp_rle8_bomb()) < 1200
    for name, data in other_formats().items():
        with pytest.raises(ImageConversionError, match='neither PNG nor JPEG'):
            message_to_rgb8(compressed('rgb8; jpeg compressed bgr8', data))


def test_png_bomb_is_refused_by_its_size():
    with pytest.raises(ImageConversionError, match='too large: 30000x30000'):
        message_to_rgb8(compressed('png', png_bomb()))


def test_progressive_jpeg_with_too_many_scans_is_refused():
    assert message_to_rgb8(compressed('jpeg', jpeg_many_scans(extra=0))).shape == (64, 64, 3)  # 10 scans: fine
    with pytest.raises(ImageConversionError, match=r'JPEG with 210 scans \(limit 100\)'):
        message_to_rgb8(compressed('jpeg', jpeg_many_scans(extra=200)))


def test_fuzz_corpus_raises_only_conversion_errors_with_bounded_memory():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get('PYTHONPATH', '')]))
    out = subprocess.run([sys.executable, __file__, str(FUZZ_CASES)], capture_output=True, text=True, timeout=600,
                         env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(result)
    assert result['unexpected'] == [], result['unexpected']
    assert result['cases'] == FUZZ_CASES
    assert result['converted'] > 50 and result['refused'] > 100  # both outcomes are exercised
    assert result['peak_growth_mb'] < PEAK_GROWTH_LIMIT_MB, result


def _run_corpus(n: int) -> dict:
    """In a fresh process: warm the decoders up, note the peak RSS, convert the corpus, note the peak again."""
    import resource

    from image_corpus import random_corpus, small_jpeg

    def peak_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB

    corpus = random_corpus(seed=13, n=n)
    message_to_rgb8(compressed('jpeg', small_jpeg()))
    before = peak_mb()
    result = {'cases': 0, 'converted': 0, 'refused': 0, 'unexpected': []}
    for i, msg in enumerate(corpus):
        result['cases'] += 1
        try:
            message_to_rgb8(msg)
            result['converted'] += 1
        except ImageConversionError:
            result['refused'] += 1
        except Exception as err:  # noqa: BLE001 - what the test is looking for
            result['unexpected'].append(f'case {i}: {type(err).__name__}: {err}'[:300])
    result['peak_growth_mb'] = round(peak_mb() - before, 1)
    return result


if __name__ == '__main__':
    print(json.dumps(_run_corpus(int(sys.argv[1]))))
