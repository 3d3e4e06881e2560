// Runs containerd's own snapshotter testsuite (snapshots/testsuite, from
// Debian's golang-github-containerd-containerd-dev) against ontop, through
// containerd's own proxy client: the one containerd uses for a
// [proxy_plugins] snapshotter. Each case gets a fresh `ontop serve` on the
// root the suite hands it.
//
// Environment: ONTOP_BIN (the ontop binary), ONTOP_BACKEND (overlayfs or
// fuse-overlayfs). tests/testsuite.rs builds and runs this.
package ontoptestsuite

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"
)

func TestOntop(t *testing.T) {
	bin := os.Getenv("ONTOP_BIN")
	backend := os.Getenv("ONTOP_BACKEND")
	if bin == "" || backend == "" {
		t.Fatal("set ONTOP_BIN to the ontop binary and ONTOP_BACKEND to overlayfs or fuse-overlayfs")
	}
	testsuite.SnapshotterSuite(t, "ontop-"+backend, func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		return serve(bin, backend, root)
	})
}

// serve starts ontop on root, waits for its socket, and returns
// containerd's proxy snapshotter on one connection to it; the cleanup
// closes the connection and stops ontop gracefully.
func serve(bin, backend, root string) (snapshots.Snapshotter, func() error, error) {
	dir := filepath.Dir(root)
	socket := filepath.Join(dir, "ontop.sock")
	config := filepath.Join(dir, "ontop.toml")
	if err := os.WriteFile(config, nil, 0o644); err != nil {
		return nil, nil, err
	}
	log, err := os.Create(filepath.Join(dir, "ontop.log"))
	if err != nil {
		return nil, nil, err
	}
	cmd := exec.Command(bin, "serve", "--config", config, "--backend", backend,
		"--root", root, "--address", socket, "--log-level", "warn")
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		return nil, nil, err
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	stop := func() error {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-exited:
			return err
		case <-time.After(20 * time.Second):
			_ = cmd.Process.Kill()
			return fmt.Errorf("ontop did not stop within 20s of SIGTERM")
		}
	}
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if c, err := net.Dial("unix", socket); err == nil {
			c.Close()
			break
		}
		select {
		case err := <-exited:
			text, _ := os.ReadFile(log.Name())
			return nil, nil, fmt.Errorf("ontop exited (%v):\n%s", err, text)
		default:
		}
		if time.Now().After(deadline) {
			_ = stop()
			return nil, nil, fmt.Errorf("ontop did not listen on %s within 20s", socket)
		}
	}
	conn, err := grpc.Dial("unix://"+socket, grpc.WithInsecure())
	if err != nil {
		_ = stop()
		return nil, nil, err
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "ontop")
	return sn, func() error {
		conn.Close()
		return stop()
	}, nil
}
