// Package containerdtestsuite runs containerd's own snapshotter conformance suite
// (github.com/containerd/containerd/snapshots/testsuite) against `erofs-passthrough serve`,
// reached the way containerd reaches a proxy plugin: gRPC over a unix socket, wrapped in
// containerd's snapshots/proxy client.
//
// Every case of the suite gets a fresh root and its own `serve` process, stopped with SIGTERM
// when the case ends. A serve that does not exit within stopTimeout of SIGTERM, or exits with
// a non-zero status, fails the case (the suite reports a cleanup error as a test error).
//
// Environment (set by tests/containerd/test_containerd_testsuite.py):
//
//	EROFS_PASSTHROUGH_PYTHON   the Python that runs `-m snapshotter.service.cli serve` (required)
//	EROFS_PASSTHROUGH_SUITE_LOGS  directory for each serve's log (default: the case's temp dir)
//
// The working directory and PYTHONPATH select which checkout of the service runs.
package containerdtestsuite

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/log"
	"github.com/containerd/containerd/pkg/dialer"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

const (
	// snapshotterName is what the proxy client sends in each request's `snapshotter` field.
	snapshotterName = "erofs-passthrough"
	// startTimeout bounds the wait for serve to answer SERVING on its health service.
	startTimeout = 60 * time.Second
	// stopTimeout is how long serve may take to exit after SIGTERM (its own grace period for
	// in-flight calls is 5 s; there are none when a case has ended).
	stopTimeout  = 10 * time.Second
	logTailLines = 30
	// maxSocketPath is sun_path's 108 bytes less the terminating NUL.
	maxSocketPath = 107
)

func TestErofsPassthroughSnapshotter(t *testing.T) {
	python := os.Getenv("EROFS_PASSTHROUGH_PYTHON")
	if python == "" {
		t.Fatal("EROFS_PASSTHROUGH_PYTHON is not set: it names the Python that runs `serve`")
	}
	testsuite.SnapshotterSuite(t, "ErofsPassthrough", func(ctx context.Context, root string) (
		snapshots.Snapshotter, func() error, error) {
		return startServe(ctx, python, root)
	})
}

// serveProcess is one running `serve` and the client connection to it.
type serveProcess struct {
	ctx     context.Context // the case's: its logger writes to the case's output
	root    string
	logPath string
	cmd     *exec.Cmd
	exited  chan struct{} // closed once cmd.Wait has returned
	waitErr error         // cmd.Wait's result, valid after exited is closed
	conn    *grpc.ClientConn
}

// startServe starts `serve` on ROOT (fresh, empty, made by the suite) and returns containerd's
// proxy snapshotter talking to it, and the cleanup that stops it.
func startServe(ctx context.Context, python, root string) (snapshots.Snapshotter, func() error, error) {
	caseDir := filepath.Dir(root) // the suite's per-case temp dir; removed after cleanup
	socket := filepath.Join(caseDir, "serve.sock")
	if len(socket) > maxSocketPath {
		return nil, nil, fmt.Errorf("socket path %s is longer than a unix socket address can be "+
			"(%d bytes); set TMPDIR to a shorter directory", socket, maxSocketPath)
	}
	logDir := os.Getenv("EROFS_PASSTHROUGH_SUITE_LOGS")
	if logDir == "" {
		logDir = caseDir
	}
	logFile, err := os.CreateTemp(logDir, filepath.Base(caseDir)+"-*.log")
	if err != nil {
		return nil, nil, err
	}
	defer logFile.Close() // the child has its own descriptor

	sp := &serveProcess{ctx: ctx, root: root, logPath: logFile.Name(), exited: make(chan struct{})}
	sp.cmd = exec.Command(python, "-m", "snapshotter.service.cli", "serve",
		"--root", root, "--address", socket, "--log-level", "debug")
	sp.cmd.Stdout, sp.cmd.Stderr = logFile, logFile
	if err := sp.cmd.Start(); err != nil {
		return nil, nil, fmt.Errorf("starting serve: %w", err)
	}
	go func() {
		sp.waitErr = sp.cmd.Wait()
		close(sp.exited)
	}()
	log.G(ctx).Infof("serve pid %d on root %s, log %s", sp.cmd.Process.Pid, root, sp.logPath)

	if err := sp.waitServing(ctx, socket); err != nil {
		if stopErr := sp.stop(); stopErr != nil {
			err = fmt.Errorf("%v\n%v", err, stopErr)
		}
		return nil, nil, err
	}
	return proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(sp.conn), snapshotterName), sp.stop, nil
}

// waitServing dials SOCKET as containerd dials a proxy plugin and waits until the health
// service says SERVING (serve creates the socket before it has finished starting).
func (sp *serveProcess) waitServing(ctx context.Context, socket string) error {
	deadline := time.Now().Add(startTimeout)
	for {
		select {
		case <-sp.exited:
			return fmt.Errorf("serve exited before serving (%v)\n%s", sp.waitErr, sp.logTail())
		default:
		}
		if _, err := os.Stat(socket); err == nil {
			if sp.conn == nil {
				conn, err := grpc.Dial(dialer.DialAddress(socket), grpc.WithInsecure(),
					grpc.WithContextDialer(dialer.ContextDialer))
				if err != nil {
					return fmt.Errorf("dialing %s: %w", socket, err)
				}
				sp.conn = conn
			}
			checkCtx, cancel := context.WithTimeout(ctx, time.Second)
			reply, err := healthpb.NewHealthClient(sp.conn).Check(checkCtx,
				&healthpb.HealthCheckRequest{})
			cancel()
			if err == nil && reply.Status == healthpb.HealthCheckResponse_SERVING {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("serve not SERVING on %s after %s\n%s", socket, startTimeout,
				sp.logTail())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// stop sends SIGTERM and waits stopTimeout for serve to exit; a serve that ignores SIGTERM is
// killed and reported, never waited out. Then it unmounts what serve left mounted under its
// root (committed layers stay mounted across a restart by design; containerd's own tests
// clean up the same way), so the suite can remove the case's directory.
func (sp *serveProcess) stop() error {
	var errs []error
	if sp.conn != nil {
		sp.conn.Close()
	}
	select {
	case <-sp.exited: // already gone: only its exit status is left to check
	default:
		sent := time.Now()
		if err := sp.cmd.Process.Signal(syscall.SIGTERM); err != nil {
			errs = append(errs, fmt.Errorf("SIGTERM to serve pid %d: %w", sp.cmd.Process.Pid, err))
		}
		select {
		case <-sp.exited:
			log.G(sp.ctx).Infof("serve pid %d exited %s after SIGTERM (%v)", sp.cmd.Process.Pid,
				time.Since(sent).Round(time.Millisecond), sp.waitErr)
		case <-time.After(stopTimeout):
			errs = append(errs, fmt.Errorf("serve pid %d still running %s after SIGTERM; killed",
				sp.cmd.Process.Pid, stopTimeout))
			sp.cmd.Process.Kill()
			<-sp.exited
		}
	}
	if len(errs) == 0 && sp.waitErr != nil {
		errs = append(errs, fmt.Errorf("serve pid %d: %v", sp.cmd.Process.Pid, sp.waitErr))
	}
	if err := unmountUnder(sp.root); err != nil {
		errs = append(errs, err)
	}
	if len(errs) > 0 {
		errs = append(errs, fmt.Errorf("serve log %s:\n%s", sp.logPath, sp.logTail()))
	}
	return joinErrors(errs)
}

// joinErrors is one error listing ERRS, one a line, or nil (Go 1.19 has no errors.Join).
func joinErrors(errs []error) error {
	if len(errs) == 0 {
		return nil
	}
	msgs := make([]string, len(errs))
	for i, err := range errs {
		msgs[i] = err.Error()
	}
	return errors.New(strings.Join(msgs, "\n"))
}

// logTail is the end of serve's log, for error messages.
func (sp *serveProcess) logTail() string {
	data, err := os.ReadFile(sp.logPath)
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > logTailLines {
		lines = lines[len(lines)-logTailLines:]
	}
	return strings.Join(lines, "\n")
}

// unmountUnder lazily unmounts every mount below DIR, deepest first.
func unmountUnder(dir string) error {
	mounts, err := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
	if err != nil {
		return fmt.Errorf("reading mountinfo: %w", err)
	}
	targets := make([]string, 0, len(mounts))
	for _, m := range mounts {
		targets = append(targets, m.Mountpoint)
	}
	sort.Slice(targets, func(i, j int) bool { return len(targets[i]) > len(targets[j]) })
	for _, target := range targets {
		if err := unix.Unmount(target, unix.MNT_DETACH); err != nil && err != unix.EINVAL {
			return fmt.Errorf("unmounting %s: %w", target, err)
		}
	}
	return nil
}
