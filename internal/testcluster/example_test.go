package testcluster_test

import (
	"context"
	"fmt"
	"net"
	"time"

	"github.com/spectroproxy/spectro-proxy/internal/testcluster"
)

// Start a cluster with a kwok node, then use exec, logs and port-forward
// through it with kubectl. (Not run: it needs `make kube-bins`.)
func ExampleStart() {
	ctx := context.Background()
	c, err := testcluster.Start(ctx, testcluster.Options{
		Kwok:      true,
		ExtraSANs: []string{"cluster-abc.proxy.test"}, // the name the relay serves it as
	})
	if err != nil {
		panic(err) // wraps testcluster.ErrBinariesMissing when not built
	}
	defer c.Stop()

	if err := c.RunPod(ctx, "demo", "app"); err != nil {
		panic(err)
	}

	// exec: kwok runs the command on this machine, in c.Dir.
	out, err := c.Kubectl(ctx, "", "exec", "-n", "demo", "app", "--", "echo", "hi")
	fmt.Println(out, err)

	// logs: the pod's output is a file in CRI format; `kubectl logs -f` follows it.
	podLog, _ := c.PodLog(ctx, "demo", "app")
	_ = podLog.Append("hello from the pod")
	out, err = c.Kubectl(ctx, "", "logs", "-n", "demo", "app")
	fmt.Println(out, err)

	// port-forward: pod port 8080 reaches a listener of the test.
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	defer l.Close()
	_ = c.PortForward(ctx, "demo", "app", 8080, l.Addr().String())
	pf := c.KubectlCmd(ctx, "", "port-forward", "-n", "demo", "--address", "127.0.0.1", "pod/app", ":8080")
	_ = pf.Start() // prints "Forwarding from 127.0.0.1:PORT -> 8080"; dial PORT
	defer pf.Process.Kill()

	// A service account token, and a kubeconfig that uses it.
	token, _ := c.ServiceAccountToken(ctx, "demo", "robot", time.Hour)
	_ = c.BindClusterRole(ctx, "demo", "robot", "cluster-admin")
	kubeconfig, _ := c.TokenKubeconfig("robot", token)
	out, err = c.Kubectl(ctx, kubeconfig, "auth", "whoami")
	fmt.Println(out, err)
}
