"""pytorchexample: the quickstart's CNN, training and testing; CIFAR-10 replaced by offline tensors."""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

TRAIN_EXAMPLES, TEST_EXAMPLES = 40_000, 10_000  # CIFAR-10's 50,000 training images, each partition 80/20


class Net(nn.Module):
    """Model (simple CNN adapted from 'PyTorch: A 60 Minute Blitz')"""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 16 * 5 * 5)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def _tensors(examples: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand((examples, 3, 32, 32), generator=generator) * 2 - 1  # as Normalize((0.5,)*3, (0.5,)*3)
    return TensorDataset(images, torch.randint(0, 10, (examples,), generator=generator))


def load_data(partition_id: int, num_partitions: int, batch_size: int, server_round: int = 0, fraction: float = 1.0):
    """Partition `partition_id`'s train and test loaders: offline tensors of CIFAR-10's shape,
    `fraction` of a CIFAR-10 partition's size."""
    train = _tensors(int(TRAIN_EXAMPLES * fraction) // num_partitions, 2 * partition_id)
    test = _tensors(int(TEST_EXAMPLES * fraction) // num_partitions, 2 * partition_id + 1)
    shuffle = torch.Generator().manual_seed(1000 * partition_id + server_round)
    trainloader = DataLoader(train, batch_size=batch_size, shuffle=True, generator=shuffle)
    return trainloader, DataLoader(test, batch_size=batch_size)


def train(net, trainloader, epochs, lr, device):
    """Train the model on the training set."""
    net.to(device)
    criterion = torch.nn.CrossEntropyLoss().to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    running_loss = 0.0
    for _ in range(epochs):
        for images, labels in trainloader:
            optimizer.zero_grad()
            loss = criterion(net(images.to(device)), labels.to(device))
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
    return running_loss / (epochs * len(trainloader))


def test(net, testloader, device):
    """Validate the model on the test set."""
    net.to(device)
    criterion = torch.nn.CrossEntropyLoss()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for images, labels in testloader:
            outputs = net(images.to(device))
            loss += criterion(outputs, labels.to(device)).item()
            correct += (torch.max(outputs.data, 1)[1] == labels.to(device)).sum().item()
    return loss / len(testloader), correct / len(testloader.dataset)
