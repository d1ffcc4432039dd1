package main

// Server mode: a minimal baton-protocol server (crypto/tls + yamux.Server)
// to run `baton connect` against a server this project did not write.
//
// Routes: every --echo-route (default "echo") echoes and answers the
// client's FIN with its own once every byte is echoed; every --reset-route
// is reset (RST) right after its preamble; any other route is reset too
// (docs/protocol.md 4). stdin: "drain [host:port]" sends DRAIN (with that
// reconnect_hint) and Go Away on every session, which then closes when its
// last stream ends or at grace; "quit" exits.

import (
	"bufio"
	"crypto/rand"
	"crypto/tls"
	"flag"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/yamux"
)

type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error { *l = append(*l, v); return nil }

type serverOpts struct {
	listen, cert, key, ca string
	requireClientCert     bool
	token, serverID       string
	heartbeatMs           int
	echoRoutes            listFlag
	resetRoutes           listFlag
	drainAfterMs          int
	drainReason           string
	drainGraceMs          int
	drainHint             string
	naiveEOF              bool
	maxWindow             int
}

type srvSession struct {
	n        int
	sess     *yamux.Session
	tap      *wireTap
	ctrl     *yamux.Stream
	ctrlMu   sync.Mutex
	active   int64 // data streams not yet ended
	streams  int64 // data streams accepted
	draining int32
	closedBy int32 // 1: this server closed the session (drained, last stream or grace)
	handlers sync.WaitGroup
}

type peerServer struct {
	o        serverOpts
	cfg      *tls.Config
	mu       sync.Mutex
	sessions map[int]*srvSession
	next     int
}

func runServer(args []string) int {
	var o serverOpts
	fs := flag.NewFlagSet("server", flag.ExitOnError)
	fs.StringVar(&o.listen, "listen", "127.0.0.1:0", "address to listen on")
	fs.StringVar(&o.cert, "cert", "", "server certificate (PEM)")
	fs.StringVar(&o.key, "key", "", "server key (PEM)")
	fs.StringVar(&o.ca, "ca", "", "CA for client certificates")
	fs.BoolVar(&o.requireClientCert, "require-client-cert", false, "mTLS: require a client certificate signed by --ca")
	fs.StringVar(&o.token, "token", "", "token HELLO must carry (empty: any)")
	fs.StringVar(&o.serverID, "server-id", "yamuxpeer", "server_id in WELCOME")
	fs.IntVar(&o.heartbeatMs, "heartbeat-ms", 15000, "heartbeat_ms in WELCOME")
	fs.Var(&o.echoRoutes, "echo-route", "a route that echoes (repeatable; default echo)")
	fs.Var(&o.resetRoutes, "reset-route", "a route whose streams are reset after the preamble (repeatable)")
	fs.IntVar(&o.drainAfterMs, "drain-after-ms", 0, "send DRAIN this many ms after each WELCOME (0: only on stdin 'drain')")
	fs.StringVar(&o.drainReason, "drain-reason", "rolling_update", "reason in DRAIN")
	fs.IntVar(&o.drainGraceMs, "drain-grace-ms", 20000, "grace_ms in DRAIN; sessions close at the latest then")
	fs.StringVar(&o.drainHint, "drain-hint", "", "reconnect_hint in DRAIN")
	fs.IntVar(&o.maxWindow, "max-window", 256<<10, "yamux MaxStreamWindowSize (receive window per stream)")
	fs.BoolVar(&o.naiveEOF, "naive-eof", false, "take yamux's Stream.Read io.EOF as the end of stream")
	fs.Parse(args)
	if len(o.echoRoutes) == 0 {
		o.echoRoutes = listFlag{"echo"}
	}
	kp, err := tls.LoadX509KeyPair(o.cert, o.key)
	if err != nil {
		fatalf(2, "server certificate: %v", err)
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{kp}, MinVersion: tls.VersionTLS12, MaxVersion: tls.VersionTLS12}
	if o.ca != "" {
		cfg.ClientCAs = certPool(o.ca)
		if o.requireClientCert {
			cfg.ClientAuth = tls.RequireAndVerifyClientCert
		} else {
			cfg.ClientAuth = tls.VerifyClientCertIfGiven
		}
	}
	ln, err := net.Listen("tcp", o.listen)
	if err != nil {
		fatalf(1, "listen %s: %v", o.listen, err)
	}
	s := &peerServer{o: o, cfg: cfg, sessions: map[int]*srvSession{}}
	emit(map[string]interface{}{"event": "ready", "listen": ln.Addr().String(), "pid": os.Getpid()})
	go func() {
		sc := bufio.NewScanner(os.Stdin)
		for sc.Scan() {
			f := strings.Fields(sc.Text())
			if len(f) == 0 {
				continue
			}
			switch f[0] {
			case "drain":
				hint := o.drainHint
				if len(f) > 1 {
					hint = f[1]
				}
				s.drainAll(hint)
			case "quit":
				os.Exit(0)
			}
		}
		// stdin closed: the test is gone
		os.Exit(0)
	}()
	for {
		c, err := ln.Accept()
		if err != nil {
			fatalf(1, "accept: %v", err)
		}
		go s.serveConn(c)
	}
}

func (s *peerServer) serveConn(raw net.Conn) {
	if tc, ok := raw.(*net.TCPConn); ok {
		tc.SetNoDelay(true)
	}
	tconn := tls.Server(raw, s.cfg)
	tconn.SetDeadline(time.Now().Add(10 * time.Second))
	if err := tconn.Handshake(); err != nil {
		emit(map[string]interface{}{"event": "tls_error", "error": err.Error()})
		raw.Close()
		return
	}
	st := tconn.ConnectionState()
	tap := newWireTap(tconn)
	ycfg := yamux.DefaultConfig()
	ycfg.EnableKeepAlive = false
	ycfg.LogOutput = os.Stderr
	ycfg.MaxStreamWindowSize = uint32(s.o.maxWindow)
	sess, err := yamux.Server(tap, ycfg)
	if err != nil {
		logf("yamux.Server: %v", err)
		raw.Close()
		return
	}
	s.mu.Lock()
	s.next++
	ss := &srvSession{n: s.next, sess: sess, tap: tap}
	s.mu.Unlock()

	ctrl, err := sess.AcceptStream()
	if err != nil {
		emit(map[string]interface{}{"event": "session_error", "session": ss.n, "error": "no control stream: " + err.Error()})
		sess.Close()
		return
	}
	tconn.SetDeadline(time.Time{})
	ss.ctrl = ctrl
	ctrl.SetReadDeadline(time.Now().Add(10 * time.Second))
	hello, err := readMessage(ctrl)
	ctrl.SetReadDeadline(time.Time{})
	ev := map[string]interface{}{"event": "session", "session": ss.n, "cipher": suiteName(st.CipherSuite),
		"tls_resumed": st.DidResume, "control_stream_id": ctrl.StreamID(),
		"client_cert": len(st.PeerCertificates) > 0}
	if err != nil || hello.typ != msgHello {
		ev["event"] = "session_error"
		ev["error"] = "no HELLO"
		emit(ev)
		sess.Close()
		return
	}
	ver, verr := hello.u16(tagVersion)
	ev["client_id"] = hello.text(tagClientID)
	ev["version"] = ver
	reject := func(code uint16, reason string) {
		ev["event"] = "rejected"
		ev["code"] = code
		emit(ev)
		ctrl.Write(encodeMessage(message{typ: msgReject, fields: []field{{tagCode, u16b(code)},
			{tagReason, []byte(reason)}}}))
		sess.GoAway()
		sess.Close()
	}
	if verr != nil || ver != 1 {
		reject(1, "unsupported version")
		return
	}
	if s.o.token != "" && hello.text(tagToken) != s.o.token {
		reject(2, "unauthorized")
		return
	}
	sid := make([]byte, 16)
	rand.Read(sid)
	welcome := encodeMessage(message{typ: msgWelcome, fields: []field{{tagSessionID, sid},
		{tagServerID, []byte(s.o.serverID)}, {tagHeartbeatMs, u32b(uint32(s.o.heartbeatMs))}}})
	if _, err := ctrl.Write(welcome); err != nil {
		sess.Close()
		return
	}
	ev["session_id"] = hexs(sid)
	emit(ev)
	s.mu.Lock()
	s.sessions[ss.n] = ss
	s.mu.Unlock()
	go io.Copy(io.Discard, ctrl) // nothing more is expected from the client on it
	if s.o.drainAfterMs > 0 {
		time.AfterFunc(time.Duration(s.o.drainAfterMs)*time.Millisecond, func() { s.drain(ss, s.o.drainHint) })
	}
	for {
		st, err := sess.AcceptStream()
		if err != nil {
			break
		}
		atomic.AddInt64(&ss.active, 1)
		atomic.AddInt64(&ss.streams, 1)
		ss.handlers.Add(1)
		go s.serveStream(ss, st)
	}
	<-sess.CloseChan()
	ss.handlers.Wait() // every stream line is out before session_end
	s.mu.Lock()
	delete(s.sessions, ss.n)
	s.mu.Unlock()
	sum := tap.summary()
	closedBy := "peer"
	if atomic.LoadInt32(&ss.closedBy) == 1 {
		closedBy = "server"
	}
	emit(map[string]interface{}{"event": "session_end", "session": ss.n, "streams": atomic.LoadInt64(&ss.streams),
		"closed_by": closedBy, "drained": atomic.LoadInt32(&ss.draining) == 1,
		"conn": sum.ConnReadError, "goaway_received": sum.GoAwayReceived, "bad_frames": sum.BadFrames})
}

func (s *peerServer) isEcho(route string) bool {
	for _, r := range s.o.resetRoutes {
		if r == route {
			return false
		}
	}
	for _, r := range s.o.echoRoutes {
		if r == route {
			return true
		}
	}
	return false
}

func (s *peerServer) serveStream(ss *srvSession, st *yamux.Stream) {
	ev := map[string]interface{}{"event": "stream", "session": ss.n, "id": st.StreamID()}
	defer func() {
		emit(ev)
		if atomic.AddInt64(&ss.active, -1) == 0 && atomic.LoadInt32(&ss.draining) == 1 {
			ss.close() // the last stream of a drained session ended (docs/protocol.md 6.4)
		}
		ss.handlers.Done()
	}()
	fr := &finReader{tap: ss.tap, st: st, naive: s.o.naiveEOF}
	route, err := readPreamble(fr)
	if err != nil {
		ev["result"] = "no_preamble"
		ev["error"] = err.Error()
		ss.tap.InjectRST(st.StreamID())
		return
	}
	ev["route"] = route
	if !s.isEcho(route) {
		ss.tap.InjectRST(st.StreamID())
		ev["result"] = "reset"
		return
	}
	var in, out int64
	buf := make([]byte, 32768)
	for {
		n, err := fr.Read(buf)
		if n > 0 {
			in += int64(n)
			k, werr := st.Write(buf[:n])
			out += int64(k)
			if werr != nil {
				ev["result"] = "write_error"
				ev["error"] = werr.Error()
				break
			}
		}
		if err == io.EOF {
			ev["fin_in"] = true
			if cerr := st.Close(); cerr != nil {
				ev["error"] = cerr.Error()
			}
			ev["result"] = "echo"
			break
		}
		if err != nil {
			ev["result"] = "read_error"
			ev["error"] = err.Error()
			break
		}
	}
	ev["bytes_in"] = in
	ev["bytes_out"] = out
	ev["premature_eofs"] = fr.prematureEOFs
}

func (s *peerServer) drainAll(hint string) {
	s.mu.Lock()
	var list []*srvSession
	for _, ss := range s.sessions {
		list = append(list, ss)
	}
	s.mu.Unlock()
	for _, ss := range list {
		s.drain(ss, hint)
	}
	emit(map[string]interface{}{"event": "drained", "sessions": len(list)})
}

// drain: DRAIN on the control stream, then Go Away (yamux then resets every
// new stream itself); the session closes when its last stream ends or at
// grace (docs/protocol.md 6).
func (s *peerServer) drain(ss *srvSession, hint string) {
	if !atomic.CompareAndSwapInt32(&ss.draining, 0, 1) {
		return
	}
	f := []field{{tagReason, []byte(s.o.drainReason)}, {tagGraceMs, u32b(uint32(s.o.drainGraceMs))}}
	if hint != "" {
		f = append(f, field{tagReconnect, []byte(hint)})
	}
	ss.ctrlMu.Lock()
	_, err := ss.ctrl.Write(encodeMessage(message{typ: msgDrain, fields: f}))
	ss.ctrlMu.Unlock()
	gerr := ss.sess.GoAway()
	ev := map[string]interface{}{"event": "drain_sent", "session": ss.n, "active": atomic.LoadInt64(&ss.active),
		"hint": hint}
	if err != nil || gerr != nil {
		ev["error"] = []interface{}{err, gerr}
	}
	emit(ev)
	if atomic.LoadInt64(&ss.active) == 0 {
		ss.close()
		return
	}
	time.AfterFunc(time.Duration(s.o.drainGraceMs)*time.Millisecond, ss.close)
}

func (ss *srvSession) close() {
	if !ss.sess.IsClosed() {
		atomic.StoreInt32(&ss.closedBy, 1)
	}
	ss.sess.Close()
}
