package main

// docs/protocol.md section 3 (control messages) and section 4 (route preamble),
// written from the text, not from baton's code.

import (
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"io"
)

const (
	msgHello   = 0x01
	msgWelcome = 0x02
	msgReject  = 0x03
	msgDrain   = 0x04

	tagVersion      = 0x01
	tagToken        = 0x02
	tagClientID     = 0x03
	tagSessionID    = 0x05
	tagServerID     = 0x06
	tagHeartbeatMs  = 0x07
	tagCode         = 0x09
	tagReason       = 0x0a
	tagGraceMs      = 0x0b
	tagReconnect    = 0x0c
	tagRetryAfterMs = 0x0d
)

type field struct {
	tag   uint8
	value []byte
}

type message struct {
	typ    uint8
	fields []field
}

func (m *message) get(tag uint8) ([]byte, bool) {
	for _, f := range m.fields {
		if f.tag == tag {
			return f.value, true
		}
	}
	return nil, false
}

func (m *message) text(tag uint8) string {
	v, _ := m.get(tag)
	return string(v)
}

func (m *message) u16(tag uint8) (uint16, error) {
	v, ok := m.get(tag)
	if !ok {
		return 0, fmt.Errorf("message 0x%02x: no field 0x%02x", m.typ, tag)
	}
	if len(v) != 2 {
		return 0, fmt.Errorf("message 0x%02x: field 0x%02x has %d bytes, want 2", m.typ, tag, len(v))
	}
	return binary.BigEndian.Uint16(v), nil
}

func (m *message) u32(tag uint8) (uint32, error) {
	v, ok := m.get(tag)
	if !ok {
		return 0, fmt.Errorf("message 0x%02x: no field 0x%02x", m.typ, tag)
	}
	if len(v) != 4 {
		return 0, fmt.Errorf("message 0x%02x: field 0x%02x has %d bytes, want 4", m.typ, tag, len(v))
	}
	return binary.BigEndian.Uint32(v), nil
}

func u16b(v uint16) []byte { b := make([]byte, 2); binary.BigEndian.PutUint16(b, v); return b }
func u32b(v uint32) []byte { b := make([]byte, 4); binary.BigEndian.PutUint32(b, v); return b }

func encodeMessage(m message) []byte {
	var body []byte
	for _, f := range m.fields {
		body = append(body, f.tag)
		body = append(body, u16b(uint16(len(f.value)))...)
		body = append(body, f.value...)
	}
	out := []byte{m.typ}
	out = append(out, u16b(uint16(len(body)))...)
	return append(out, body...)
}

func readMessage(r io.Reader) (message, error) {
	var hdr [3]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return message{}, err
	}
	m := message{typ: hdr[0]}
	body := make([]byte, binary.BigEndian.Uint16(hdr[1:3]))
	if _, err := io.ReadFull(r, body); err != nil {
		return m, fmt.Errorf("message 0x%02x cut short: %v", m.typ, err)
	}
	for len(body) > 0 {
		if len(body) < 3 {
			return m, fmt.Errorf("message 0x%02x: %d stray bytes after the fields", m.typ, len(body))
		}
		tag := body[0]
		n := int(binary.BigEndian.Uint16(body[1:3]))
		if len(body) < 3+n {
			return m, fmt.Errorf("message 0x%02x: field 0x%02x longer than the message", m.typ, tag)
		}
		m.fields = append(m.fields, field{tag, append([]byte(nil), body[3:3+n]...)})
		body = body[3+n:]
	}
	return m, nil
}

func helloMessage(version uint16, token, clientID string) []byte {
	m := message{typ: msgHello, fields: []field{{tagVersion, u16b(version)}}}
	if token != "" {
		m.fields = append(m.fields, field{tagToken, []byte(token)})
	}
	if clientID != "" {
		m.fields = append(m.fields, field{tagClientID, []byte(clientID)})
	}
	return encodeMessage(m)
}

func preamble(route string) []byte {
	return append([]byte{byte(len(route))}, route...)
}

func readPreamble(r io.Reader) (string, error) {
	var n [1]byte
	if _, err := io.ReadFull(r, n[:]); err != nil {
		return "", err
	}
	if n[0] == 0 {
		return "", fmt.Errorf("route preamble of length 0")
	}
	b := make([]byte, n[0])
	if _, err := io.ReadFull(r, b); err != nil {
		return "", err
	}
	return string(b), nil
}

func hexs(b []byte) string { return hex.EncodeToString(b) }
