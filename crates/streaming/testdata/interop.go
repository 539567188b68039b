// Command interop drives a CRI streaming URL with client-go exactly as crictl
// does (SPDY and WebSocket executors, SPDY and SPDY-over-WebSocket
// port-forward dialers). The streaming crate's `client_go_interop` test runs
// it when STREAMING_GO_CLIENT names the built binary.
//
// Build it inside a module that vendors client-go, e.g. a copy of cri-tools:
//
//	cp -r cri-tools /tmp/crit && mkdir /tmp/crit/cmd/interop
//	cp interop.go /tmp/crit/cmd/interop/main.go
//	cd /tmp/crit && go build -mod=vendor -o /tmp/interop ./cmd/interop
//
// usage: interop exec-spdy|exec-ws|exec-spdy-tty|exec-ws-tty|pf-spdy|pf-ws URL
package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	"k8s.io/apimachinery/pkg/util/httpstream"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/portforward"
	remoteclient "k8s.io/client-go/tools/remotecommand"
	"k8s.io/client-go/transport/spdy"
)

type sizes struct{ n int }

func (s *sizes) Next() *remoteclient.TerminalSize {
	if s.n >= 2 {
		time.Sleep(time.Hour)
		return nil
	}
	s.n++
	return &remoteclient.TerminalSize{Width: uint16(80 * s.n), Height: uint16(24 * s.n)}
}

func main() {
	mode, raw := os.Args[1], os.Args[2]
	u, err := url.Parse(raw)
	if err != nil {
		panic(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	config := &rest.Config{}
	switch {
	case strings.HasPrefix(mode, "exec"):
		var ex remoteclient.Executor
		if strings.HasPrefix(mode, "exec-ws") {
			ex, err = remoteclient.NewWebSocketExecutor(config, "GET", raw)
		} else {
			ex, err = remoteclient.NewSPDYExecutor(config, "POST", u)
		}
		if err != nil {
			panic(err)
		}
		var out, errOut bytes.Buffer
		opts := remoteclient.StreamOptions{Stdin: strings.NewReader(strings.Repeat("hello ", 20000)), Stdout: &out}
		if strings.HasSuffix(mode, "-tty") {
			opts.Tty = true
			opts.TerminalSizeQueue = &sizes{}
		} else {
			opts.Stderr = &errOut
		}
		err = ex.StreamWithContext(ctx, opts)
		fmt.Printf("stdout=%d:%s\n", out.Len(), tail(out.String()))
		fmt.Printf("err=%v\n", err)
	case strings.HasPrefix(mode, "pf"):
		var dialer httpstream.Dialer
		if mode == "pf-ws" {
			dialer, err = portforward.NewSPDYOverWebsocketDialer(u, config)
			if err != nil {
				panic(err)
			}
		} else {
			tr, up, err := spdy.RoundTripperFor(config)
			if err != nil {
				panic(err)
			}
			dialer = spdy.NewDialer(up, &http.Client{Transport: tr}, "POST", u)
		}
		stop, ready := make(chan struct{}), make(chan struct{})
		fw, err := portforward.NewOnAddresses(dialer, []string{"127.0.0.1"}, []string{"0:80", "0:1"}, stop, ready, io.Discard, os.Stderr)
		if err != nil {
			panic(err)
		}
		errCh := make(chan error, 1)
		go func() { errCh <- fw.ForwardPorts() }()
		select {
		case <-ready:
		case err := <-errCh:
			fmt.Printf("forward failed: %v\n", err)
			return
		}
		ports, _ := fw.GetPorts()
		for _, p := range ports {
			c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", p.Local))
			if err != nil {
				panic(err)
			}
			c.Write([]byte("ping"))
			c.SetReadDeadline(time.Now().Add(3 * time.Second))
			buf := make([]byte, 100)
			n, err := c.Read(buf)
			fmt.Printf("port %d: %q err=%v\n", p.Remote, buf[:n], err)
			c.Close()
		}
		close(stop)
		fmt.Printf("forward done: %v\n", <-errCh)
	}
}

func tail(s string) string {
	if len(s) > 40 {
		return s[len(s)-40:]
	}
	return s
}

