package main

// Deterministic pseudo-random content: one random block of odd length
// (1 MiB + 7) and a per-stream start offset, so that two streams never carry
// the same bytes at the same offset and a lost, repeated or reordered chunk
// never lines up with what was expected.

import (
	"bytes"
	"math/rand"
)

const patternLen = (1 << 20) + 7

var patternDoubled []byte

func init() {
	r := rand.New(rand.NewSource(0x6261746f6e)) // "baton"
	block := make([]byte, patternLen)
	r.Read(block)
	patternDoubled = append(append([]byte(nil), block...), block...)
}

type pattern struct{ start int64 }

func patternFor(run, stream int) pattern {
	return pattern{start: (int64(run)*1000003 + int64(stream)*7919) % patternLen}
}

// fill writes the bytes at absolute offset off into b.
func (p pattern) fill(b []byte, off int64) {
	for len(b) > 0 {
		o := (p.start + off) % patternLen
		n := copy(b, patternDoubled[o:o+patternLen])
		b = b[n:]
		off += int64(n)
	}
}

// check returns -1 if b equals the bytes at offset off, else the absolute
// offset of the first byte that differs.
func (p pattern) check(b []byte, off int64) int64 {
	for done := 0; done < len(b); {
		o := (p.start + off + int64(done)) % patternLen
		n := len(b) - done
		if n > patternLen {
			n = patternLen
		}
		want := patternDoubled[o : o+int64(n)]
		if !bytes.Equal(b[done:done+n], want) {
			for i := 0; i < n; i++ {
				if b[done+i] != want[i] {
					return off + int64(done+i)
				}
			}
		}
		done += n
	}
	return -1
}
