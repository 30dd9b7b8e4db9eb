#!/usr/bin/env python3
"""Fuzz loop for convert/convert.py's reader (zip + restricted unpickler + storages).

Builds valid torch-format checkpoints with tests/test_convert.py's writer, then for SECONDS
mutates them (bit flips, byte overwrites, truncation, insertions; in the raw file and inside
data.pkl before re-zipping) and runs convert.main on each. A mutation must end in success or in
convert.py's own clean error (exit 1 with a message); any other exception is a finding, saved
to build-fuzz/crashes/convert/. Stdlib only.

usage: python3 tests/fuzz/fuzz_convert.py [SECONDS] [--replay DIR]
"""
import contextlib, io, os, random, signal, struct, sys, tempfile, time, traceback, zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, 'convert'))
sys.path.insert(0, os.path.join(ROOT, 'tests'))
import convert  # noqa: E402
import test_convert as tc  # noqa: E402


def seeds(tmp):
    out = []
    p = os.path.join(tmp, 'plain.ckpt')
    tc.write_ckpt(p, {'a.weight': tc.tensor('F32', (3, 4), tc.f32(range(12))),
                      'b': tc.tensor('F16', (5,), struct.pack('<5e', 1, 2, 3, 4, 5))})
    out.append(p)
    p = os.path.join(tmp, 'lightning.ckpt')
    tc.write_ckpt(p, tc.lightning_ckpt({'model.diffusion_model.x.weight': tc.tensor('F32', (2, 2), tc.f32([1, 2, 3, 4]))}))
    out.append(p)
    return [open(q, 'rb').read() for q in out]


def mutate(data, rng):
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(5)
        if op == 0 and b:
            i = rng.randrange(len(b)); b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            i = rng.randrange(len(b)); b[i] = rng.randrange(256)
        elif op == 2 and b:
            del b[rng.randrange(len(b)):]
        elif op == 3:
            i = rng.randrange(len(b) + 1); b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif op == 4 and len(b) > 4:
            i = rng.randrange(len(b) - 4); b[i:i + 4] = rng.choice([b'\xff\xff\xff\x7f', b'\0\0\0\0', b'\x80\0\0\0'])
    return bytes(b)


def mutate_pickle(data, rng):
    """Mutates data.pkl inside the zip and rebuilds a valid zip around it."""
    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, 'w', zipfile.ZIP_STORED) as z:
        for n in src.namelist():
            d = src.read(n)
            z.writestr(n, mutate(d, rng) if n.endswith('data.pkl') or rng.random() < 0.1 else d)
    return out.getvalue()


class Hang(Exception):
    pass


def on_alarm(sig, frame):
    raise Hang('one conversion took over 10 s')


def run_one(data, tmp):
    """Runs convert.main on data; a run over 10 s raises Hang (a finding)."""
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(10)
    try:
        return run_conversion(data, tmp)
    finally:
        signal.alarm(0)


def run_conversion(data, tmp):
    path = os.path.join(tmp, 'in.ckpt')
    open(path, 'wb').write(data)
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        rc = convert.main([path, '--out', os.path.join(tmp, 'out.safetensors')])
    return rc


def main():
    secs = float(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1][0].isdigit() else 60
    crash_dir = os.path.join(ROOT, 'build-fuzz', 'crashes', 'convert')
    rng = random.Random(1234)
    n = findings = 0
    with tempfile.TemporaryDirectory() as tmp:
        if '--replay' in sys.argv:
            d = sys.argv[sys.argv.index('--replay') + 1]
            for f in sorted(os.listdir(d)) if os.path.isdir(d) else []:
                run_one(open(os.path.join(d, f), 'rb').read(), tmp)
                n += 1
            print('%d passed, 0 failed' % n)
            return 0
        base = seeds(tmp)
        t0 = time.time()
        while time.time() - t0 < secs:
            s = rng.choice(base)
            data = mutate_pickle(s, rng) if rng.random() < 0.6 else mutate(s, rng)
            try:
                run_one(data, tmp)
            except SystemExit:
                pass
            except Exception:
                findings += 1
                os.makedirs(crash_dir, exist_ok=True)
                name = os.path.join(crash_dir, 'crash-%d' % n)
                open(name, 'wb').write(data)
                print('finding: %s\n%s' % (name, traceback.format_exc()), file=sys.stderr)
            n += 1
    print('%-14s %6ds  %12d execs  %-20s  findings %d' % ('convert.py', secs, n, 'python', findings))
    return 1 if findings else 0


if __name__ == '__main__':
    sys.exit(main())
