package main

// Client mode: crypto/tls (TLS 1.2) + yamux.Client against `baton serve`,
// HELLO on stream 1, then one scenario.

import (
	"bufio"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/yamux"
)

type clientOpts struct {
	server, ca, serverName, cipher, token, clientID, route, scenario string
	cert, key                                                        string
	helloVersion                                                     int
	timeout                                                          time.Duration
	naiveEOF                                                         bool
	heartbeat                                                        bool
	maxWindow                                                        int

	streams, runs, writeSize, readSize int
	bytes                              int64
	finDelay, readDelay                time.Duration
	concurrent, readAfterClose         bool

	expectRejectCode int
	roundsBefore     int
	roundsAfter      int
	chunk            int
	tailBytes        int64
	streamingAfter   int64
	resetAfterData   int
}

type streamResult struct {
	Run           int    `json:"run"`
	Index         int    `json:"i"`
	ID            uint32 `json:"id"`
	Route         string `json:"route,omitempty"`
	Sent          int64  `json:"sent"`
	Recv          int64  `json:"recv"`
	WireRecv      int64  `json:"wire_recv"`
	Identical     bool   `json:"identical"`
	MismatchAt    int64  `json:"mismatch_at"`
	EOF           bool   `json:"eof"`
	Reset         bool   `json:"reset"`
	Acked         bool   `json:"acked"`
	WireFIN       bool   `json:"wire_fin"`
	DataAfterFin  int64  `json:"data_after_fin,omitempty"`
	PrematureEOFs int64  `json:"premature_eofs,omitempty"`
	RoundTrips    int    `json:"round_trips,omitempty"`
	WriteErr      string `json:"write_err,omitempty"`
	ReadErr       string `json:"read_err,omitempty"`
	OpenErr       string `json:"open_err,omitempty"`
	ElapsedMs     int64  `json:"ms"`
}

type drainEvent struct {
	Event         string `json:"event"`
	Reason        string `json:"reason"`
	GraceMs       int64  `json:"grace_ms"`
	ReconnectHint string `json:"reconnect_hint,omitempty"`
}

type clientResult struct {
	Event     string                 `json:"event"`
	Scenario  string                 `json:"scenario"`
	OK        bool                   `json:"ok"`
	Failures  []string               `json:"failures"`
	TLS       map[string]interface{} `json:"tls,omitempty"`
	Welcome   map[string]interface{} `json:"welcome,omitempty"`
	Reject    map[string]interface{} `json:"reject,omitempty"`
	Drains    []drainEvent           `json:"drains"`
	Tap       tapSummary             `json:"tap"`
	Pings     map[string]int64       `json:"pings"`
	Extra     map[string]interface{} `json:"extra"`
	Streams   []*streamResult        `json:"streams"`
	ElapsedMs int64                  `json:"elapsed_ms"`
}

type client struct {
	o        clientOpts
	conn     *tls.Conn
	tap      *wireTap
	sess     *yamux.Session
	ctrl     *yamux.Stream
	ctrlR    *finReader // one reader for the control stream's whole life
	deadline time.Time
	start    time.Time

	mu       sync.Mutex
	res      clientResult
	drainCh  chan struct{}
	drainOne sync.Once
	stdin    chan string

	pingsOK, pingsFailed int64
}

func (c *client) fail(format string, a ...interface{}) {
	c.mu.Lock()
	defer c.mu.Unlock()
	msg := fmt.Sprintf(format, a...)
	if len(c.res.Failures) < 50 {
		c.res.Failures = append(c.res.Failures, msg)
	} else if len(c.res.Failures) == 50 {
		c.res.Failures = append(c.res.Failures, "(more failures left out)")
	}
}

func (c *client) extra(k string, v interface{}) {
	c.mu.Lock()
	c.res.Extra[k] = v
	c.mu.Unlock()
}

func (c *client) addStream(r *streamResult) {
	c.mu.Lock()
	c.res.Streams = append(c.res.Streams, r)
	c.mu.Unlock()
}

func (c *client) finish() int {
	if c.tap != nil {
		c.res.Tap = c.tap.summary()
	}
	c.res.Pings = map[string]int64{"ok": atomic.LoadInt64(&c.pingsOK), "failed": atomic.LoadInt64(&c.pingsFailed)}
	c.res.ElapsedMs = time.Since(c.start).Milliseconds()
	c.mu.Lock()
	c.res.OK = len(c.res.Failures) == 0
	ok := c.res.OK
	emit(&c.res)
	c.mu.Unlock()
	if ok {
		return 0
	}
	return 1
}

func runClient(args []string) int {
	var o clientOpts
	fs := flag.NewFlagSet("client", flag.ExitOnError)
	fs.StringVar(&o.server, "server", "", "baton serve address HOST:PORT")
	fs.StringVar(&o.ca, "ca", "", "CA certificate (PEM) of the server's certificate")
	fs.StringVar(&o.serverName, "server-name", "localhost", "name checked in the server certificate (and SNI)")
	fs.StringVar(&o.cipher, "cipher", "", "offer only this suite ("+suiteNames()+")")
	fs.StringVar(&o.cert, "cert", "", "client certificate (mTLS)")
	fs.StringVar(&o.key, "key", "", "client key (mTLS)")
	fs.StringVar(&o.token, "token", "", "token sent in HELLO")
	fs.StringVar(&o.clientID, "client-id", "yamuxpeer", "client_id sent in HELLO")
	fs.IntVar(&o.helloVersion, "hello-version", 1, "version sent in HELLO")
	fs.StringVar(&o.route, "route", "echo", "route of the data streams")
	fs.StringVar(&o.scenario, "scenario", "echo", "echo | reset | unknown-route | reject | drain | continuous | hello")
	fs.DurationVar(&o.timeout, "timeout", 60*time.Second, "the whole run; past it the client reports what is unfinished and exits 1")
	fs.BoolVar(&o.naiveEOF, "naive-eof", false, "take yamux's Stream.Read io.EOF as the end of stream (see wiretap.go)")
	fs.IntVar(&o.maxWindow, "max-window", 256<<10, "yamux MaxStreamWindowSize: a bigger receive window, granted in the SYN's Window Update and as the client reads")
	fs.BoolVar(&o.heartbeat, "heartbeat", true, "ping every heartbeat_ms of WELCOME (docs/protocol.md 5)")
	fs.IntVar(&o.streams, "streams", 1, "data streams per run")
	fs.IntVar(&o.runs, "runs", 1, "runs of the scenario in a row on the same session")
	fs.Int64Var(&o.bytes, "bytes", 65536, "bytes each stream sends (echo)")
	fs.IntVar(&o.writeSize, "write-size", 16384, "bytes per Write")
	fs.IntVar(&o.readSize, "read-size", 65536, "bytes per Read")
	fs.DurationVar(&o.finDelay, "fin-delay", 0, "wait this long after the last write before Close() (FIN)")
	fs.DurationVar(&o.readDelay, "read-delay", 0, "sleep between reads (a slow reader)")
	fs.BoolVar(&o.concurrent, "concurrent", false, "open the streams from one goroutine each, released at once")
	fs.BoolVar(&o.readAfterClose, "read-after-close", false, "read the echo only after Close() (send, shut down, then read)")
	fs.IntVar(&o.expectRejectCode, "expect-reject-code", 2, "reject: the REJECT code expected")
	fs.IntVar(&o.roundsBefore, "rounds-before", 3, "drain: round trips per stream before printing streaming")
	fs.IntVar(&o.roundsAfter, "rounds-after", 5, "drain: round trips per stream after DRAIN")
	fs.IntVar(&o.chunk, "chunk", 32768, "drain/continuous: bytes per round trip or write")
	fs.Int64Var(&o.tailBytes, "tail-bytes", 8<<20, "continuous: bytes each stream still sends after 'finish' on stdin")
	fs.Int64Var(&o.streamingAfter, "streaming-after", 1<<20, "continuous: bytes echoed on every stream before printing streaming")
	fs.IntVar(&o.resetAfterData, "reset-data", 1000, "reset: bytes sent on the second stream before its RST")
	fs.Parse(args)
	if o.server == "" {
		fatalf(2, "client: --server is required")
	}
	if n := runtime.NumCPU(); n < 4 {
		// more threads than CPUs, so that goroutines opening streams at the
		// same moment are really interleaved (SYNs out of id order)
		runtime.GOMAXPROCS(4)
	}
	c := &client{o: o, start: time.Now(), drainCh: make(chan struct{}), stdin: make(chan string, 16)}
	c.deadline = c.start.Add(o.timeout)
	c.res = clientResult{Event: "result", Scenario: o.scenario, Failures: []string{}, Drains: []drainEvent{},
		Extra: map[string]interface{}{}, Streams: []*streamResult{}}
	go func() {
		sc := bufio.NewScanner(os.Stdin)
		for sc.Scan() {
			c.stdin <- strings.TrimSpace(sc.Text())
		}
		close(c.stdin)
	}()
	watchdog := time.AfterFunc(o.timeout+2*time.Second, func() {
		c.fail("timeout: the scenario did not end within %v", o.timeout)
		c.mu.Lock()
		for _, s := range c.res.Streams {
			if !s.EOF && s.ReadErr == "" {
				s.ReadErr = "unfinished at timeout"
			}
		}
		c.mu.Unlock()
		os.Exit(c.finish())
	})
	defer watchdog.Stop()

	if err := c.dial(); err != nil {
		c.fail("dial: %v", err)
		return c.finish()
	}
	rejected, err := c.hello()
	if err != nil {
		c.fail("hello: %v", err)
		return c.finish()
	}
	if o.scenario == "reject" {
		c.scenarioReject(rejected)
		return c.finish()
	}
	if rejected {
		c.fail("REJECT instead of WELCOME: %v", c.res.Reject)
		return c.finish()
	}
	go c.controlLoop()
	if o.heartbeat {
		go c.pingLoop()
	}
	switch o.scenario {
	case "hello":
	case "echo":
		c.scenarioEcho()
	case "reset":
		c.scenarioReset()
	case "unknown-route":
		c.scenarioUnknownRoute()
	case "drain":
		c.scenarioDrain()
	case "continuous":
		c.scenarioContinuous()
	default:
		fatalf(2, "unknown scenario %q", o.scenario)
	}
	c.checkCommon()
	return c.finish()
}

func (c *client) dial() error {
	cfg := &tls.Config{
		MinVersion: tls.VersionTLS12,
		MaxVersion: tls.VersionTLS12,
		ServerName: c.o.serverName,
	}
	if c.o.ca != "" {
		cfg.RootCAs = certPool(c.o.ca)
	}
	if c.o.cipher != "" {
		id, ok := suites[c.o.cipher]
		if !ok {
			fatalf(2, "unknown --cipher %q (one of %s)", c.o.cipher, suiteNames())
		}
		cfg.CipherSuites = []uint16{id}
	}
	if c.o.cert != "" {
		kp, err := tls.LoadX509KeyPair(c.o.cert, c.o.key)
		if err != nil {
			fatalf(2, "client certificate: %v", err)
		}
		cfg.Certificates = []tls.Certificate{kp}
	}
	d := net.Dialer{Timeout: 10 * time.Second}
	conn, err := tls.DialWithDialer(&d, "tcp", c.o.server, cfg)
	if err != nil {
		return err
	}
	c.conn = conn
	st := conn.ConnectionState()
	c.res.TLS = map[string]interface{}{"version": tlsVersionName(st.Version), "cipher": suiteName(st.CipherSuite),
		"resumed": st.DidResume}
	c.tap = newWireTap(conn)
	ycfg := yamux.DefaultConfig()
	ycfg.EnableKeepAlive = false
	ycfg.LogOutput = os.Stderr
	ycfg.MaxStreamWindowSize = uint32(c.o.maxWindow)
	c.sess, err = yamux.Client(c.tap, ycfg)
	return err
}

// hello sends HELLO on stream 1 and reads WELCOME or REJECT.
func (c *client) hello() (rejected bool, err error) {
	c.ctrl, err = c.sess.OpenStream()
	if err != nil {
		return false, err
	}
	if c.ctrl.StreamID() != 1 {
		return false, fmt.Errorf("the first stream has id %d", c.ctrl.StreamID())
	}
	c.ctrl.SetDeadline(c.deadline)
	_, werr := c.ctrl.Write(helloMessage(uint16(c.o.helloVersion), c.o.token, c.o.clientID))
	if werr != nil && werr != yamux.ErrSessionShutdown {
		return false, werr
	}
	// ErrSessionShutdown: yamux may report it for a write that went out
	// when the session ends right after (a REJECT closes it at once): the
	// answer can still be in its buffer
	c.ctrlR = c.newReader(c.ctrl)
	m, err := readMessage(c.ctrlR)
	if err != nil {
		if werr != nil {
			return false, fmt.Errorf("writing HELLO: %v; reading the answer: %v", werr, err)
		}
		return false, fmt.Errorf("reading WELCOME: %v", err)
	}
	switch m.typ {
	case msgWelcome:
		sid, _ := m.get(tagSessionID)
		hb, err := m.u32(tagHeartbeatMs)
		if err != nil {
			return false, err
		}
		if len(sid) != 16 {
			c.fail("WELCOME session_id has %d bytes, want 16", len(sid))
		}
		c.res.Welcome = map[string]interface{}{"session_id": hexs(sid), "server_id": m.text(tagServerID),
			"heartbeat_ms": hb}
		return false, nil
	case msgReject:
		code, err := m.u16(tagCode)
		if err != nil {
			return true, err
		}
		c.res.Reject = map[string]interface{}{"code": code, "reason": m.text(tagReason)}
		if v, err := m.u32(tagRetryAfterMs); err == nil {
			c.res.Reject["retry_after_ms"] = v
		}
		return true, nil
	}
	return false, fmt.Errorf("first control message has type 0x%02x", m.typ)
}

// controlLoop reads control messages after WELCOME (DRAIN).
func (c *client) controlLoop() {
	c.ctrl.SetReadDeadline(time.Time{})
	c.ctrlR.deadline = time.Time{}
	for {
		m, err := readMessage(c.ctrlR)
		if err != nil {
			return
		}
		if m.typ != msgDrain {
			continue // unknown types are ignored (docs/protocol.md 3)
		}
		ev := drainEvent{Event: "drain", Reason: m.text(tagReason), ReconnectHint: m.text(tagReconnect)}
		if g, err := m.u32(tagGraceMs); err == nil {
			ev.GraceMs = int64(g)
		} else {
			c.fail("DRAIN: %v", err)
		}
		c.mu.Lock()
		c.res.Drains = append(c.res.Drains, ev)
		c.mu.Unlock()
		emit(ev)
		c.drainOne.Do(func() { close(c.drainCh) })
	}
}

func (c *client) pingLoop() {
	hb, _ := c.res.Welcome["heartbeat_ms"].(uint32)
	if hb == 0 {
		return
	}
	for {
		select {
		case <-time.After(time.Duration(hb) * time.Millisecond):
		case <-c.sess.CloseChan():
			return
		}
		if _, err := c.sess.Ping(); err != nil {
			if c.sess.IsClosed() {
				return
			}
			atomic.AddInt64(&c.pingsFailed, 1)
		} else {
			atomic.AddInt64(&c.pingsOK, 1)
		}
	}
}

// checkCommon: what must hold after every scenario but reject and drain.
func (c *client) checkCommon() {
	ts := c.tap.summary()
	if len(ts.BadFrames) > 0 {
		c.fail("frames that break docs/protocol.md 2: %v", ts.BadFrames)
	}
	if c.o.scenario == "drain" {
		return
	}
	if ts.GoAwayReceived >= 0 {
		c.fail("the server sent Go Away (code %d)", ts.GoAwayReceived)
	}
	if c.sess.IsClosed() || ts.ConnClosedByPeer {
		c.fail("the session is closed at the end (connection: %q)", ts.ConnReadError)
	} else {
		if _, err := c.sess.Ping(); err != nil {
			c.fail("ping at the end: %v", err)
		}
	}
	if len(c.res.Drains) > 0 {
		c.fail("unexpected DRAIN: %v", c.res.Drains)
	}
}

type echoSpec struct {
	bytes          int64
	writeSize      int
	readSize       int
	finDelay       time.Duration
	readDelay      time.Duration
	readAfterClose bool
	route          string
}

func (c *client) spec() echoSpec {
	return echoSpec{bytes: c.o.bytes, writeSize: c.o.writeSize, readSize: c.o.readSize, finDelay: c.o.finDelay,
		readDelay: c.o.readDelay, readAfterClose: c.o.readAfterClose, route: c.o.route}
}

func (c *client) newReader(st *yamux.Stream) *finReader {
	return &finReader{tap: c.tap, st: st, naive: c.o.naiveEOF, deadline: c.deadline}
}

// echoStream sends spec.bytes of the stream's pattern after the preamble,
// Close()s spec.finDelay after the last write, and reads the echo until the
// end of stream in parallel; it fills r.
func (c *client) echoStream(st *yamux.Stream, run, idx int, spec echoSpec, r *streamResult) {
	t0 := time.Now()
	r.ID = st.StreamID()
	r.MismatchAt = -1
	st.SetDeadline(c.deadline)
	pat := patternFor(run, idx)
	wdone := make(chan struct{})
	go func() {
		defer close(wdone)
		if _, err := st.Write(preamble(spec.route)); err != nil {
			r.WriteErr = "preamble: " + err.Error()
			return
		}
		buf := make([]byte, spec.writeSize)
		for r.Sent < spec.bytes {
			n := int64(len(buf))
			if spec.bytes-r.Sent < n {
				n = spec.bytes - r.Sent
			}
			pat.fill(buf[:n], r.Sent)
			k, err := st.Write(buf[:n])
			r.Sent += int64(k)
			if err != nil {
				r.WriteErr = err.Error()
				return
			}
		}
		if spec.finDelay > 0 {
			time.Sleep(spec.finDelay)
		}
		if err := st.Close(); err != nil {
			r.WriteErr = "close: " + err.Error()
		}
	}()
	if spec.readAfterClose {
		<-wdone
	}
	fr := c.newReader(st)
	buf := make([]byte, spec.readSize)
	for {
		n, err := fr.Read(buf)
		if n > 0 {
			want := int64(n)
			if r.Recv+want > spec.bytes {
				want = spec.bytes - r.Recv
				if r.MismatchAt < 0 {
					r.MismatchAt = spec.bytes // more bytes than were sent
				}
			}
			if want > 0 && r.MismatchAt < 0 {
				r.MismatchAt = pat.check(buf[:want], r.Recv)
			}
			r.Recv += int64(n)
		}
		if err == io.EOF {
			r.EOF = true
			break
		}
		if err != nil {
			if errors.Is(err, yamux.ErrConnectionReset) {
				r.Reset = true
			}
			r.ReadErr = err.Error()
			break
		}
		if spec.readDelay > 0 {
			time.Sleep(spec.readDelay)
		}
	}
	<-wdone
	r.PrematureEOFs = fr.prematureEOFs
	w, _, _ := c.tap.stream(r.ID)
	r.WireRecv, r.Acked, r.WireFIN, r.DataAfterFin = w.dataBytes, w.ack, w.fin, w.dataAfterFin
	if w.rst {
		r.Reset = true
	}
	r.Identical = r.MismatchAt < 0 && r.Recv == spec.bytes && r.Sent == spec.bytes
	r.ElapsedMs = time.Since(t0).Milliseconds()
}

func (c *client) checkEchoStream(r *streamResult, bytes int64) {
	if r.OpenErr != "" || r.WriteErr != "" || r.ReadErr != "" || !r.EOF || !r.Identical || r.DataAfterFin > 0 {
		c.fail("run %d stream %d (id %d): sent %d/%d, received %d (on the wire %d), identical %v, "+
			"first difference at %d, end of stream %v, FIN on the wire %v, reset %v, data after FIN %d, errors: open %q write %q read %q",
			r.Run, r.Index, r.ID, r.Sent, bytes, r.Recv, r.WireRecv, r.Identical, r.MismatchAt, r.EOF, r.WireFIN,
			r.Reset, r.DataAfterFin, r.OpenErr, r.WriteErr, r.ReadErr)
	}
}

func (c *client) scenarioEcho() {
	spec := c.spec()
	for run := 0; run < c.o.runs; run++ {
		results := make([]*streamResult, c.o.streams)
		for i := range results {
			results[i] = &streamResult{Run: run, Index: i, Route: spec.route, MismatchAt: -1}
			c.addStream(results[i])
		}
		var wg sync.WaitGroup
		if c.o.concurrent {
			// every goroutine opens its own stream the moment the gate opens:
			// ids are taken in one order, SYNs hit the wire in another
			gate := make(chan struct{})
			for i := range results {
				wg.Add(1)
				go func(i int) {
					defer wg.Done()
					<-gate
					st, err := c.sess.OpenStream()
					if err != nil {
						results[i].OpenErr = err.Error()
						return
					}
					c.echoStream(st, run, i, spec, results[i])
				}(i)
			}
			close(gate)
		} else {
			for i := range results {
				st, err := c.sess.OpenStream()
				if err != nil {
					results[i].OpenErr = err.Error()
					continue
				}
				wg.Add(1)
				go func(i int, st *yamux.Stream) {
					defer wg.Done()
					c.echoStream(st, run, i, spec, results[i])
				}(i, st)
			}
		}
		wg.Wait()
		failed := 0
		for _, r := range results {
			before := len(c.res.Failures)
			c.checkEchoStream(r, spec.bytes)
			if len(c.res.Failures) != before {
				failed++
			}
		}
		if failed > 0 {
			c.fail("run %d: %d of %d streams failed", run, failed, len(results))
		}
		if c.sess.IsClosed() {
			c.fail("run %d: the session closed (%v)", run, c.tap.summary().ConnReadError)
			return
		}
	}
}

// scenarioReset: streams reset by the client (RST right after SYN, and RST
// after the preamble and some data) must not disturb the session.
func (c *client) scenarioReset() {
	ids := []uint32{}
	for i := 0; i < c.o.streams; i++ {
		st, err := c.sess.OpenStream() // sends SYN
		if err != nil {
			c.fail("open: %v", err)
			return
		}
		c.tap.InjectRST(st.StreamID())
		ids = append(ids, st.StreamID())
		st2, err := c.sess.OpenStream()
		if err != nil {
			c.fail("open: %v", err)
			return
		}
		st2.SetDeadline(c.deadline)
		data := make([]byte, c.o.resetAfterData)
		patternFor(0, i).fill(data, 0)
		if _, err := st2.Write(append(preamble(c.o.route), data...)); err != nil {
			c.fail("write before RST: %v", err)
		}
		c.tap.InjectRST(st2.StreamID())
		ids = append(ids, st2.StreamID())
	}
	c.extra("reset_ids", ids)
	c.afterCheck("after client resets")
}

// afterCheck: a fresh stream on the same session still echoes.
func (c *client) afterCheck(what string) {
	st, err := c.sess.OpenStream()
	r := &streamResult{Run: -1, Index: -1, Route: "echo", MismatchAt: -1}
	c.addStream(r)
	if err != nil {
		r.OpenErr = err.Error()
		c.fail("%s: open: %v", what, err)
		return
	}
	spec := c.spec()
	spec.route = "echo"
	spec.bytes = 65536
	c.echoStream(st, 9999, 0, spec, r)
	before := len(c.res.Failures)
	c.checkEchoStream(r, spec.bytes)
	if len(c.res.Failures) != before {
		c.fail("%s: the next stream on the same session did not echo", what)
	}
}

// scenarioUnknownRoute: a stream to a route the server does not have is
// reset (docs/protocol.md 4); the session stays usable.
func (c *client) scenarioUnknownRoute() {
	for i := 0; i < c.o.streams; i++ {
		st, err := c.sess.OpenStream()
		r := &streamResult{Run: 0, Index: i, Route: c.o.route, MismatchAt: -1}
		c.addStream(r)
		if err != nil {
			r.OpenErr = err.Error()
			c.fail("open: %v", err)
			return
		}
		r.ID = st.StreamID()
		st.SetDeadline(c.deadline)
		if _, err := st.Write(append(preamble(c.o.route), []byte("hello?")...)); err != nil {
			r.WriteErr = err.Error()
		} else {
			r.Sent = 6
		}
		fr := c.newReader(st)
		buf := make([]byte, 4096)
		for {
			n, err := fr.Read(buf)
			r.Recv += int64(n)
			if err == io.EOF {
				r.EOF = true
				break
			}
			if err != nil {
				r.ReadErr = err.Error()
				r.Reset = errors.Is(err, yamux.ErrConnectionReset)
				break
			}
		}
		w, _, _ := c.tap.stream(r.ID)
		r.WireRecv, r.Acked, r.WireFIN = w.dataBytes, w.ack, w.fin
		if !w.rst || !r.Reset || r.Recv != 0 {
			c.fail("stream to unknown route %q (id %d): want RST and no data; got RST %v, read error %q, %d bytes, FIN %v",
				c.o.route, r.ID, w.rst, r.ReadErr, r.Recv, r.EOF)
		}
	}
	c.afterCheck("after an unknown route")
}

func (c *client) scenarioReject(rejected bool) {
	if !rejected {
		c.fail("WELCOME (%v) instead of REJECT %d", c.res.Welcome, c.o.expectRejectCode)
		return
	}
	if code, _ := c.res.Reject["code"].(uint16); int(code) != c.o.expectRejectCode {
		c.fail("REJECT code %v, want %d", c.res.Reject["code"], c.o.expectRejectCode)
	}
	// After REJECT the server sends Go Away and closes the connection.
	if !c.tap.waitReadClosed(time.Until(c.deadline)) {
		c.fail("the connection is still open after REJECT")
	}
	ts := c.tap.summary()
	if ts.GoAwayReceived < 0 {
		c.fail("no Go Away after REJECT")
	}
	c.extra("closed_after_reject", ts.ConnClosedByPeer)
}

func (c *client) streaming(extra map[string]interface{}) {
	ev := map[string]interface{}{"event": "streaming"}
	for k, v := range extra {
		ev[k] = v
	}
	emit(ev)
}

// roundTripper runs echo round trips of chunk bytes on one stream (write a
// chunk, read it back) until stop says so, then Close()s and reads to EOF.
type roundTripper struct {
	c    *client
	st   *yamux.Stream
	r    *streamResult
	pat  pattern
	fr   *finReader
	buf  []byte
	rbuf []byte
}

func (rt *roundTripper) once() bool {
	n := int64(len(rt.buf))
	rt.pat.fill(rt.buf, rt.r.Sent)
	if _, err := rt.st.Write(rt.buf); err != nil {
		rt.r.WriteErr = err.Error()
		return false
	}
	rt.r.Sent += n
	got := int64(0)
	for got < n {
		k, err := rt.fr.Read(rt.rbuf[:n-got])
		if k > 0 {
			if m := rt.pat.check(rt.rbuf[:k], rt.r.Recv); m >= 0 && rt.r.MismatchAt < 0 {
				rt.r.MismatchAt = m
			}
			rt.r.Recv += int64(k)
			got += int64(k)
		}
		if err != nil {
			rt.r.ReadErr = err.Error()
			rt.r.Reset = errors.Is(err, yamux.ErrConnectionReset)
			return false
		}
	}
	rt.r.RoundTrips++
	return true
}

func (rt *roundTripper) closeAndDrain() {
	if err := rt.st.Close(); err != nil {
		rt.r.WriteErr = "close: " + err.Error()
	}
	for {
		k, err := rt.fr.Read(rt.rbuf)
		rt.r.Recv += int64(k)
		if k > 0 && rt.r.MismatchAt < 0 {
			rt.r.MismatchAt = rt.r.Recv - int64(k) // nothing may come after the last echo
		}
		if err == io.EOF {
			rt.r.EOF = true
			break
		}
		if err != nil {
			rt.r.ReadErr = err.Error()
			break
		}
	}
	w, _, _ := rt.c.tap.stream(rt.r.ID)
	rt.r.WireRecv, rt.r.Acked, rt.r.WireFIN, rt.r.DataAfterFin = w.dataBytes, w.ack, w.fin, w.dataAfterFin
	rt.r.PrematureEOFs = rt.fr.prematureEOFs
	rt.r.Identical = rt.r.MismatchAt < 0 && rt.r.Recv == rt.r.Sent
}

func (c *client) newRoundTripper(i int) (*roundTripper, error) {
	r := &streamResult{Run: 0, Index: i, Route: c.o.route, MismatchAt: -1}
	c.addStream(r)
	st, err := c.sess.OpenStream()
	if err != nil {
		r.OpenErr = err.Error()
		return nil, err
	}
	r.ID = st.StreamID()
	st.SetDeadline(c.deadline)
	if _, err := st.Write(preamble(c.o.route)); err != nil {
		r.WriteErr = err.Error()
		return nil, err
	}
	return &roundTripper{c: c, st: st, r: r, pat: patternFor(0, i), fr: c.newReader(st),
		buf: make([]byte, c.o.chunk), rbuf: make([]byte, c.o.chunk)}, nil
}

// scenarioDrain: streams do round trips; once every stream has done
// roundsBefore of them the client prints {"event":"streaming"} and the test
// starts a drain. After DRAIN + Go Away: the old streams go on for
// roundsAfter round trips and end intact, a new stream is refused, and the
// server closes the session when the last stream has ended.
func (c *client) scenarioDrain() {
	rts := []*roundTripper{}
	for i := 0; i < c.o.streams; i++ {
		rt, err := c.newRoundTripper(i)
		if err != nil {
			c.fail("open stream %d: %v", i, err)
			return
		}
		rts = append(rts, rt)
	}
	var ready sync.WaitGroup
	var done sync.WaitGroup
	for _, rt := range rts {
		ready.Add(1)
		done.Add(1)
		go func(rt *roundTripper) {
			defer done.Done()
			ok := true
			for i := 0; i < c.o.roundsBefore && ok; i++ {
				ok = rt.once()
			}
			ready.Done()
			// keep the stream busy until DRAIN, then roundsAfter more
			for ok {
				select {
				case <-c.drainCh:
				default:
					ok = rt.once()
					continue
				}
				break
			}
			for i := 0; i < c.o.roundsAfter && ok; i++ {
				ok = rt.once()
			}
			rt.closeAndDrain()
		}(rt)
	}
	ready.Wait()
	c.streaming(map[string]interface{}{"streams": len(rts)})
	select {
	case <-c.drainCh:
	case <-time.After(time.Until(c.deadline)):
		c.fail("no DRAIN on the control stream")
		return
	}
	drainAt := time.Now()
	// Go Away follows DRAIN (docs/protocol.md 6.1)
	c.tap.waitGoAway(time.Until(c.deadline))
	if code := c.tap.goAwayCode(); code != 0 {
		c.fail("after DRAIN: Go Away code %d, want 0 (-1: none)", code)
	}
	// a new stream is refused: yamux itself refuses after Go Away...
	if _, err := c.sess.OpenStream(); err != yamux.ErrRemoteGoAway {
		c.fail("OpenStream after Go Away: %v, want %v", err, yamux.ErrRemoteGoAway)
	}
	// ...so send the SYN by hand (an odd id never used), with a preamble:
	// the server must reset it (docs/protocol.md 6.2)
	const lateID = 0x7ffffff1
	late := append(frameHeader(typeData, flagSYN, lateID, uint32(len(preamble(c.o.route)))), preamble(c.o.route)...)
	c.tap.Inject(late)
	for {
		w, ch, closed := c.tap.stream(lateID)
		if w.rst || w.ack || closed {
			c.extra("late_stream", map[string]interface{}{"rst": w.rst, "ack": w.ack, "data": w.dataBytes})
			if !w.rst || w.ack {
				c.fail("a stream opened after Go Away: RST %v, ACK %v (want RST and no ACK)", w.rst, w.ack)
			}
			break
		}
		select {
		case <-ch:
		case <-time.After(time.Until(c.deadline)):
			c.fail("a stream opened after Go Away was neither reset nor accepted")
		}
		if time.Now().After(c.deadline) {
			break
		}
	}
	done.Wait()
	lastEnd := time.Now()
	for _, rt := range rts {
		before := len(c.res.Failures)
		c.checkEchoStream(rt.r, rt.r.Sent)
		if len(c.res.Failures) == before && rt.r.RoundTrips < c.o.roundsBefore+c.o.roundsAfter {
			c.fail("stream %d: %d round trips", rt.r.Index, rt.r.RoundTrips)
		}
	}
	// the server closes the session when its last stream has ended
	closed := c.tap.waitReadClosed(time.Until(c.deadline))
	c.extra("ms_from_drain_to_last_stream_end", lastEnd.Sub(drainAt).Milliseconds())
	c.extra("ms_from_last_stream_end_to_close", time.Since(lastEnd).Milliseconds())
	if !closed {
		c.fail("the server did not close the drained session after its last stream")
	}
}

// scenarioContinuous: streams write without pause (and read the echo in
// parallel) until "finish" arrives on stdin; then each sends tail-bytes more,
// Close()s, and checks every byte came back. {"event":"streaming"} is
// printed once every stream has had streaming-after bytes echoed; "mark" on
// stdin prints {"event":"progress","echoed":N}.
func (c *client) scenarioContinuous() {
	type cs struct {
		st   *yamux.Stream
		r    *streamResult
		pat  pattern
		recv int64 // atomic
	}
	var all []*cs
	for i := 0; i < c.o.streams; i++ {
		r := &streamResult{Run: 0, Index: i, Route: c.o.route, MismatchAt: -1}
		c.addStream(r)
		st, err := c.sess.OpenStream()
		if err != nil {
			r.OpenErr = err.Error()
			c.fail("open: %v", err)
			return
		}
		r.ID = st.StreamID()
		st.SetDeadline(c.deadline)
		all = append(all, &cs{st: st, r: r, pat: patternFor(0, i)})
	}
	var sentNow int64
	var finish int32 // atomic: 1 once "finish" came on stdin
	var wg sync.WaitGroup
	for _, s := range all {
		wg.Add(2)
		go func(s *cs) { // writer
			defer wg.Done()
			if _, err := s.st.Write(preamble(c.o.route)); err != nil {
				s.r.WriteErr = err.Error()
				return
			}
			buf := make([]byte, c.o.chunk)
			limit := int64(0) // bytes to send in total, known at "finish"
			for {
				if limit == 0 && atomic.LoadInt32(&finish) == 1 {
					limit = s.r.Sent + c.o.tailBytes
				}
				n := int64(len(buf))
				if limit > 0 {
					if s.r.Sent >= limit {
						break
					}
					if limit-s.r.Sent < n {
						n = limit - s.r.Sent
					}
				}
				s.pat.fill(buf[:n], s.r.Sent)
				k, err := s.st.Write(buf[:n])
				s.r.Sent += int64(k)
				atomic.AddInt64(&sentNow, int64(k))
				if err != nil {
					s.r.WriteErr = err.Error()
					return
				}
			}
			if err := s.st.Close(); err != nil {
				s.r.WriteErr = "close: " + err.Error()
			}
		}(s)
		go func(s *cs) { // reader
			defer wg.Done()
			fr := c.newReader(s.st)
			buf := make([]byte, 65536)
			for {
				n, err := fr.Read(buf)
				if n > 0 {
					if m := s.pat.check(buf[:n], s.r.Recv); m >= 0 && s.r.MismatchAt < 0 {
						s.r.MismatchAt = m
					}
					s.r.Recv += int64(n)
					atomic.StoreInt64(&s.recv, s.r.Recv)
				}
				if err == io.EOF {
					s.r.EOF = true
					break
				}
				if err != nil {
					s.r.ReadErr = err.Error()
					s.r.Reset = errors.Is(err, yamux.ErrConnectionReset)
					break
				}
			}
			s.r.PrematureEOFs = fr.prematureEOFs
		}(s)
	}
	echoed := func() int64 {
		t := int64(0)
		for _, s := range all {
			t += atomic.LoadInt64(&s.recv)
		}
		return t
	}
	// streaming: every stream has had streamingAfter bytes back
	for {
		min := int64(-1)
		for _, s := range all {
			if v := atomic.LoadInt64(&s.recv); min < 0 || v < min {
				min = v
			}
		}
		if min >= c.o.streamingAfter {
			break
		}
		if time.Now().After(c.deadline) || c.sess.IsClosed() {
			c.fail("the transfer did not get under way (%d bytes echoed)", echoed())
			return
		}
		time.Sleep(2 * time.Millisecond)
	}
	c.streaming(map[string]interface{}{"echoed": echoed()})
	finished := false
	for !finished {
		select {
		case cmd, ok := <-c.stdin:
			if !ok || cmd == "finish" {
				finished = true
			} else if cmd == "mark" {
				emit(map[string]interface{}{"event": "progress", "echoed": echoed(), "sent": atomic.LoadInt64(&sentNow)})
			}
		case <-time.After(time.Until(c.deadline)):
			c.fail("no 'finish' on stdin")
			finished = true
		}
	}
	atFinish := echoed()
	atomic.StoreInt32(&finish, 1)
	wg.Wait()
	c.extra("echoed_at_finish", atFinish)
	for _, s := range all {
		w, _, _ := c.tap.stream(s.r.ID)
		s.r.WireRecv, s.r.Acked, s.r.WireFIN, s.r.DataAfterFin = w.dataBytes, w.ack, w.fin, w.dataAfterFin
		s.r.Identical = s.r.MismatchAt < 0 && s.r.Recv == s.r.Sent
		c.checkEchoStream(s.r, s.r.Sent)
	}
}
