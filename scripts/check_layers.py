#!/usr/bin/env python3
"""The include half of the layer check (docs/design.md, "Layers in the build").

Reads every #include of every file under src/FOLDER/ and include/baton/ and
fails when one reaches a folder that FOLDER may not use: one on its own floor
or above. The linker cannot see such uses when they are only types or inline
functions; the link half of the check (layer_link_* in meson.build) sees calls.

    check_layers.py --root SRC_ROOT [--stamp FILE --depfile FILE]
                    [--public DIR=FOLDER...] FOLDER=USES...

FOLDER=USES: a folder of src/ and the folders it may use, comma separated
(the table in meson.build). --public include/baton=client: a public header
folder that belongs to a layer. An include is classified by the file it
resolves to, the way the compiler finds it ("x.h" next to the includer
first, then include/, then src/), so <net/if.h> stays a system header.
The depfile lists every file and folder read, so ninja reruns the check when
a file changes or a file is added.
"""
import argparse
import re
import sys
from pathlib import Path

INCLUDE = re.compile(r'^\s*#\s*include\s*([<"])([^>"]+)[>"]')
SOURCE_SUFFIXES = {'.h', '.hh', '.hpp', '.cc', '.cpp', '.cxx', '.inc', '.ipp'}


def floors(table):
    """Floor of each folder: 1 for one that uses nothing, else one above the highest it uses."""
    result = {}

    def floor(name, seen):
        if name in result:
            return result[name]
        if name in seen:
            sys.exit(f'layer check: the table has a circle through {name}')
        uses = table[name]
        result[name] = 1 + max((floor(u, seen | {name}) for u in uses), default=0)
        return result[name]

    for name in table:
        for u in table[name]:
            if u not in table:
                sys.exit(f'layer check: {name} uses {u}, which is not a folder of the table')
        floor(name, set())
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--root', required=True, type=Path)
    ap.add_argument('--stamp', type=Path)
    ap.add_argument('--depfile', type=Path)
    ap.add_argument('--public', action='append', default=[])
    ap.add_argument('layers', nargs='+')
    args = ap.parse_args()

    root = args.root.resolve()
    src = root / 'src'
    table = {}
    for item in args.layers:
        name, _, uses = item.partition('=')
        table[name] = [u for u in uses.split(',') if u]
    floor = floors(table)

    # folder on disk -> layer it belongs to
    owners = {src / name: name for name in table}
    for item in args.public:
        path, _, name = item.partition('=')
        if name not in table:
            sys.exit(f'layer check: --public {item}: {name} is not a folder of the table')
        owners[root / path] = name

    errors = []
    read = [src]
    for sub in sorted(p for p in src.iterdir() if p.is_dir()):
        if sub not in owners:
            errors.append(f'src/{sub.name}/ is in no layer: give it a line in the layer table '
                          f'(meson.build, "layers")')
    for path in sorted(src.iterdir()):
        if path.is_file() and path.suffix in SOURCE_SUFFIXES:
            errors.append(f'{path.relative_to(root)} is in no layer: it belongs in a folder of src/')

    def layer_of(path):
        for folder, name in owners.items():
            if path.is_relative_to(folder):
                return name
        return None

    def resolve(includer, text, quoted):
        candidates = [includer.parent / text] if quoted else []
        candidates += [root / 'include' / text, src / text]
        for c in candidates:
            if c.is_file():
                return c.resolve()
        return None

    for folder, name in sorted(owners.items()):
        if not folder.is_dir():
            continue
        allowed = [name] + table[name]
        for path in sorted(folder.rglob('*')):
            if path.is_dir():
                read.append(path)
                continue
            if path.suffix not in SOURCE_SUFFIXES:
                continue
            read.append(path)
            rel = path.relative_to(root)
            with open(path, encoding='utf-8', errors='replace') as f:
                for lineno, line in enumerate(f, 1):
                    m = INCLUDE.match(line)
                    if not m:
                        continue
                    quoted = m.group(1) == '"'
                    text = m.group(2)
                    shown = f'"{text}"' if quoted else f'<{text}>'
                    target = resolve(path, text, quoted)
                    if target is None:
                        continue  # a system or library header
                    if not target.is_relative_to(root):
                        continue
                    used = layer_of(target)
                    if used is None:
                        errors.append(
                            f'{rel}:{lineno}: #include {shown} reaches '
                            f'{target.relative_to(root)}, which is in no layer; '
                            f'{name} (floor {floor[name]}) may use {", ".join(allowed)}')
                    elif used not in allowed:
                        errors.append(
                            f'{rel}:{lineno}: #include {shown} runs back up: '
                            f'{name} (floor {floor[name]}) may not use {used} '
                            f'(floor {floor[used]}); {name} may use {", ".join(allowed)}')
        read.append(folder)

    if errors:
        for e in errors:
            print(f'layer check: {e}', file=sys.stderr)
        print(f'layer check: FAILED, {len(errors)} problem(s); the allowed uses are the layer '
              f'table in meson.build (docs/design.md, "Layers in the build")', file=sys.stderr)
        return 1

    if args.depfile and args.stamp:
        def esc(p):
            return str(p).replace('\\', '\\\\').replace(' ', '\\ ').replace('$', '$$')
        deps = [Path(__file__).resolve()] + sorted(set(read))
        args.depfile.write_text(f'{esc(args.stamp)}: ' + ' \\\n  '.join(esc(p) for p in deps) + '\n')
    if args.stamp:
        args.stamp.write_text(''.join(f'{n} (floor {floor[n]}): {", ".join(table[n]) or "-"}\n'
                                      for n in table))
    return 0


if __name__ == '__main__':
    sys.exit(main())
